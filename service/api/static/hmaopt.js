// Shared by the job and compare pages: REST calls with the CSRF header, trial points in
// columns (GET /v1/jobs/{id}/points), the reward-tax classes, ±SE error bars and the
// per-layer ratio profile.
"use strict";
window.hmaopt = (function () {
  const csrf = (document.cookie.match(/(?:^|; )hmaopt_csrf=([^;]*)/) || [])[1] || "";
  const api = (path, opts = {}) => fetch(path, Object.assign({credentials: "same-origin",
    headers: Object.assign({"X-CSRF-Token": decodeURIComponent(csrf),
                            "Content-Type": "application/json"}, opts.headers || {})}, opts))
    .then(async r => {
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.message || r.statusText);
      return body;
    });

  // Columns -> one small object per trial (number, kind, state, feasible, reward, tax,
  // uniform_ratio, reward_se, tax_se: standard errors, null where the trial has none).
  const col = (p, name, i) => p[name] ? p[name][i] : null;
  const rows = p => p.number.map((n, i) => ({number: n, kind: p.kind[i], state: p.state[i],
    feasible: p.feasible[i], reward: p.reward[i], tax: p.tax[i], uniform_ratio: p.uniform_ratio[i],
    reward_se: col(p, "reward_se", i), tax_se: col(p, "tax_se", i)}));

  // Plotly error bars of ±1 standard error (error_x / error_y) for the points ``ts``.
  const errorBars = (ts, key, color) => ({type: "data", array: ts.map(t => t[key] ?? null),
    visible: ts.some(t => t[key] !== null && t[key] !== undefined), color, thickness: 1.2, width: 3});

  // 0 feasible, 1 over budget, 2 pruned (stage 1 only: no reward)
  const cls = t => t.state === "pruned" ? 2 : (t.feasible ? 0 : 1);
  const better = (t, b) => t.feasible && t.reward !== null && (b === null || t.reward > b.reward);
  const bestOf = ts => ts.reduce((b, t) => better(t, b) ? t : b, null);

  // Best feasible reward after each trial, by trial number.
  function bestSoFar(ts) {
    let run = null; const x = [], y = [];
    for (const t of ts.slice().sort((a, b) => a.number - b.number)) {
      if (t.feasible && t.reward !== null && (run === null || t.reward > run)) run = t.reward;
      x.push(t.number); y.push(run);
    }
    return {x, y, last: run};
  }

  // The uniform-α baseline points, by α.
  const uniform = ts => ts.filter(t => t.kind === "uniform" && t.reward !== null)
    .sort((a, b) => a.uniform_ratio - b.uniform_ratio);

  // α of every decoder layer under a trial's ratios: one trace, or two (attention, MLP) when
  // the grouping splits them. Without a layout yet (no worker has started the job): by slot.
  function profile(ratios, layout, name, extra = {}) {
    const nl = ratios.non_layer !== undefined ? ` · non-layer α=${(+ratios.non_layer).toFixed(3)}` : "";
    if (!layout) return [Object.assign({type: "scatter", mode: "lines+markers", name: name + nl,
      x: Object.keys(ratios), y: Object.values(ratios)}, extra)];
    const layers = [...Array(layout.num_layers).keys()];
    const groupOf = {};
    layout.groups.forEach(g => g.layers.forEach(l => { groupOf[l] = g.name; }));
    const split = layout.spec && layout.spec.split_attn_mlp;
    const parts = split ? [[".attn", " attention"], [".mlp", " MLP"]] : [["", ""]];
    return parts.map(([suffix, label], k) => Object.assign({type: "scatter", mode: "lines+markers",
      name: name + label + nl, x: layers, y: layers.map(l => ratios[groupOf[l] + suffix]),
      line: {shape: "hvh", dash: k ? "dashdot" : "solid"}}, extra));
  }
  // Legends in a band at the bottom of the figure, under the x-axis title (never over it).
  const below = (height, rows = 2) => ({height, margin: {t: 50, b: 70 + 22 * rows},
    legend: {orientation: "h", yref: "container", yanchor: "bottom", y: 0.01, x: 0}});
  // Traces that draw the very same line (same x and y: two jobs' equal budgets, baselines,
  // curves or profiles) become one, drawn thicker in grey and named after all of them, so
  // no line hides another. ``meta.shared``: how many traces it stands for.
  function mergeSame(traces, color = "#555") {
    const groups = new Map();
    for (const t of traces) {
      const key = JSON.stringify([t.x, t.y]);
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(t);
    }
    return [...groups.values()].map(g => g.length === 1 ? g[0] : Object.assign({}, g[0], {
      name: g.map(t => t.name).join(" = "), legendgroup: undefined, showlegend: true,
      line: Object.assign({}, g[0].line, {color, width: 3}),
      meta: Object.assign({}, g[0].meta, {shared: g.length})}));
  }
  const profileLayout = layout => Object.assign(below(360), {
    // two short lines: one long one was clipped in a narrow figure
    title: {text: "ratio profile<br><span style='font-size: 12px'>α = weight on the aligned model</span>"},
    margin: {t: 64, b: 114},
    xaxis: {title: {text: layout ? "decoder layer" : "ratio slot"}, dtick: 1},
    yaxis: {title: {text: "α"}, range: [-0.02, 1.02]}});

  const fmt = (v, d) => v === null || v === undefined ? "—" : (+v).toPrecision(d);
  // ``d`` decimals (a table column's fixed precision), "—" for none
  const fixed = (v, d) => v === null || v === undefined ? "—" : (+v).toFixed(d);
  // "± se" (two significant digits), or "" when there is none
  const pm = se => se === null || se === undefined ? "" : "± " + (+se).toPrecision(2);
  return {api, rows, cls, bestOf, bestSoFar, uniform, profile, profileLayout, below, fmt, fixed, pm,
          errorBars, mergeSame, config: {displaylogo: false, responsive: true}};
})();
