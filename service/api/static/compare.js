// The compare page: each job's trial points (pruned ones too, marked), best-so-far curve and
// best ratio profile, overlaid in one colour per job (the same colours as the table's
// swatches); each job's best point and uniform-α points carry ±1 SE error bars. Lines two
// jobs share exactly (an equal budget, the same baseline curve, equal curves or profiles)
// are drawn once, in grey, named after every job they stand for (H.mergeSame).
"use strict";
(function () {
  const H = window.hmaopt;
  const jobs = JSON.parse(document.getElementById("compare-jobs").textContent);
  // asked for at once: this script runs before plotly.js has loaded (the page includes it
  // first); the figures wait for the document
  const pointsP = Promise.all(jobs.map(j => H.api(`/v1/jobs/${j.id}/points`)));
  const parsed = new Promise(r => document.readyState === "loading" ?
    document.addEventListener("DOMContentLoaded", r) : r());
  const label = j => j.name + " · " + j.id.slice(0, 8);
  async function draw() {
    const points = await pointsP;
    await parsed;
    const all = jobs.map((j, i) => H.rows(points[i]));
    // the plotted rewards' range: budget lines span it, pruned trials (no reward) sit at its foot
    const ys = all.flat().map(t => t.reward).filter(v => v !== null);
    const lo = ys.length ? Math.min(...ys) : 0, hi = ys.length ? Math.max(...ys) : 1;
    const scatter = [], lines = [], curves = [], profiles = [];
    jobs.forEach((j, i) => {
      const ts = all[i], name = label(j);
      const done = ts.filter(t => t.reward !== null);
      // one legend entry per job (its feasible points; the title says what each marker is)
      for (const [feasible, symbol, suffix] of [[true, "circle", ""], [false, "x", " (over budget)"]]) {
        const sel = done.filter(t => t.feasible === feasible);
        scatter.push({type: "scattergl", mode: "markers", name: name + suffix, legendgroup: j.id,
          showlegend: feasible,
          x: sel.map(t => t.tax), y: sel.map(t => t.reward), customdata: sel.map(t => t.number),
          marker: {color: j.color, symbol, size: 7, opacity: feasible ? 0.8 : 0.5},
          hovertemplate: "trial %{customdata}<br>tax %{x:.4f}<br>reward %{y:.4f}<extra>" + name + "</extra>"});
      }
      const pruned = ts.filter(t => t.state === "pruned");
      scatter.push({type: "scattergl", mode: "markers", name: name + " (pruned: no reward, drawn at the foot)",
        legendgroup: j.id, showlegend: false, x: pruned.map(t => t.tax), y: pruned.map(() => lo),
        customdata: pruned.map(t => t.number), meta: {pruned: true},
        marker: {color: j.color, symbol: "triangle-down-open", size: 8},
        hovertemplate: "trial %{customdata}: pruned after stage 1<br>tax %{x:.4f}<br>no reward<extra>" + name + "</extra>"});
      const uni = H.uniform(ts);
      lines.push({type: "scatter", mode: "lines", name: name + " uniform α", legendgroup: j.id,
        x: uni.map(t => t.tax), y: uni.map(t => t.reward), line: {dash: "dot", color: j.color},
        error_x: H.errorBars(uni, "tax_se", j.color), error_y: H.errorBars(uni, "reward_se", j.color),
        showlegend: false, meta: {kind: "uniform"}});
      lines.push({type: "scatter", mode: "lines", x: [j.budget, j.budget], y: [lo, hi],
        name: name + " budget " + j.budget, legendgroup: j.id, showlegend: false,
        line: {dash: "dash", color: j.color, width: 1}, hoverinfo: "name", meta: {kind: "budget"}});
      const b = j.best ? [j.best] : [];  // the job's best (its answer once it has a result)
      scatter.push({type: "scatter", mode: "markers", name: name + " best ±1 SE", legendgroup: j.id,
        x: b.map(t => t.tax), y: b.map(t => t.reward), customdata: b.map(t => t.trial), showlegend: false,
        error_x: H.errorBars(b, "tax_se", j.color), error_y: H.errorBars(b, "reward_se", j.color),
        // each later job's star a little smaller: equal bests show as concentric stars
        marker: {symbol: "star", size: Math.max(7, 18 - 3 * i), color: j.color, line: {color: "#000", width: 1}},
        hovertemplate: "best: trial %{customdata}<br>tax %{x:.4f}<br>reward %{y:.4f}<extra>" + name + "</extra>"});
      const curve = H.bestSoFar(ts);
      curves.push({type: "scatter", mode: "lines", name, x: curve.x, y: curve.y,
        line: {shape: "hv", color: j.color}});
      if (j.best_ratios) profiles.push(...H.profile(j.best_ratios, j.layout, name + " best",
        {line: {shape: "hvh", color: j.color}}));
    });
    const shared = H.mergeSame(lines);
    const rows = jobs.length + shared.filter(t => t.meta.shared).length;  // legend entries
    Plotly.react("scatter", scatter.concat(shared), Object.assign(H.below(440 + 22 * rows, rows), {
      title: {text: "reward vs tax<br><span style='font-size: 12px'>● feasible, ✕ over budget, " +
        "▽ pruned (no reward: at the foot); dashed: each job's budget; dotted: its uniform α " +
        "curve;<br>grey: a line several jobs share</span>"},
      margin: {t: 80, b: 70 + 22 * rows},
      xaxis: {title: {text: "tax"}}, yaxis: {title: {text: "reward"}}}), H.config);
    Plotly.react("best-so-far", H.mergeSame(curves), Object.assign(H.below(360, jobs.length), {
      title: {text: "best feasible reward so far"}, xaxis: {title: {text: "trial"}},
      yaxis: {title: {text: "best feasible reward"}}}), H.config);
    Plotly.react("profile", H.mergeSame(profiles), H.profileLayout(jobs.every(j => j.layout) ? jobs[0].layout : null), H.config);
  }
  if (jobs.length) draw().catch(e => { document.getElementById("page-error").textContent = e.message; });
})();
