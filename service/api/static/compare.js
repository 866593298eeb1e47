// The compare page: each job's trial points, best-so-far curve and best ratio profile,
// overlaid in one colour per job (the same colours as the table's swatches); each job's best
// point and uniform-α points carry ±1 SE error bars.
"use strict";
(function () {
  const H = window.hmaopt;
  const jobs = JSON.parse(document.getElementById("compare-jobs").textContent);
  // asked for at once: this script runs before plotly.js has loaded (the page includes it
  // first); the figures wait for the document
  const pointsP = Promise.all(jobs.map(j => H.api(`/v1/jobs/${j.id}/points`)));
  const parsed = new Promise(r => document.readyState === "loading" ?
    document.addEventListener("DOMContentLoaded", r) : r());
  async function draw() {
    const points = await pointsP;
    await parsed;
    const scatter = [], curves = [], profiles = [];
    jobs.forEach((j, i) => {
      const ts = H.rows(points[i]);
      const label = j.name + " · " + j.id.slice(0, 8);
      const done = ts.filter(t => t.reward !== null);
      for (const [feasible, symbol, suffix] of [[true, "circle", ""], [false, "x", " (over budget)"]]) {
        const sel = done.filter(t => t.feasible === feasible);
        scatter.push({type: "scattergl", mode: "markers", name: label + suffix, legendgroup: j.id,
          x: sel.map(t => t.tax), y: sel.map(t => t.reward), customdata: sel.map(t => t.number),
          marker: {color: j.color, symbol, size: 7, opacity: feasible ? 0.8 : 0.5},
          hovertemplate: "trial %{customdata}<br>tax %{x:.4f}<br>reward %{y:.4g}<extra>" + label + "</extra>"});
      }
      const uni = H.uniform(ts);
      scatter.push({type: "scatter", mode: "lines", name: label + " uniform α", legendgroup: j.id,
        x: uni.map(t => t.tax), y: uni.map(t => t.reward), line: {dash: "dot", color: j.color},
        error_x: H.errorBars(uni, "tax_se", j.color), error_y: H.errorBars(uni, "reward_se", j.color),
        showlegend: false});
      const b = j.best ? [j.best] : [];  // the job's best (its answer once it has a result)
      scatter.push({type: "scatter", mode: "markers", name: label + " best ±1 SE", legendgroup: j.id,
        x: b.map(t => t.tax), y: b.map(t => t.reward), customdata: b.map(t => t.trial), showlegend: false,
        error_x: H.errorBars(b, "tax_se", j.color), error_y: H.errorBars(b, "reward_se", j.color),
        marker: {symbol: "star", size: 14, color: j.color, line: {color: "#000", width: 1}},
        hovertemplate: "best: trial %{customdata}<br>tax %{x:.4f}<br>reward %{y:.4g}<extra>" + label + "</extra>"});
      scatter.push({type: "scatter", mode: "lines", x: [j.budget, j.budget], y: [0, 1], yaxis: "y",
        xaxis: "x", name: label + " budget", legendgroup: j.id, showlegend: false,
        line: {dash: "dash", color: j.color, width: 1}, hoverinfo: "name"});
      const curve = H.bestSoFar(ts);
      curves.push({type: "scattergl", mode: "lines", name: label, x: curve.x, y: curve.y,
        line: {shape: "hv", color: j.color}});
      if (j.best_ratios) profiles.push(...H.profile(j.best_ratios, j.layout, label + " best",
        {line: {shape: "hvh", color: j.color}}));
    });
    // the budget lines span the plotted rewards
    const ys = scatter.flatMap(t => t.name.endsWith(" budget") ? [] : t.y).filter(v => v !== null);
    const lo = ys.length ? Math.min(...ys) : 0, hi = ys.length ? Math.max(...ys) : 1;
    scatter.filter(t => t.name.endsWith(" budget")).forEach(t => { t.y = [lo, hi]; });
    Plotly.react("scatter", scatter, Object.assign(H.below(460 + 22 * jobs.length, jobs.length), {
      title: {text: "reward vs tax (dashed: each job's budget; dotted: its uniform α curve)"},
      xaxis: {title: {text: "tax"}}, yaxis: {title: {text: "reward"}}}), H.config);
    Plotly.react("best-so-far", curves, Object.assign(H.below(360, jobs.length), {
      title: {text: "best feasible reward so far"}, xaxis: {title: {text: "trial"}}}), H.config);
    Plotly.react("profile", profiles, H.profileLayout(jobs.every(j => j.layout) ? jobs[0].layout : null), H.config);
  }
  if (jobs.length) draw().catch(e => { document.getElementById("page-error").textContent = e.message; });
})();
