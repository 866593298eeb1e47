// The live job page: trials from the REST API (paged), kept current over the job's SSE
// stream (EventSource reconnects with Last-Event-ID by itself). New trials are appended to
// the figures (Plotly.extendTraces), never re-rendered from scratch.
"use strict";
(function () {
  const root = document.getElementById("job");
  const jobId = root.dataset.job, budget = parseFloat(root.dataset.budget);
  const csrf = root.dataset.csrf;
  const PAGE = 50;
  let sort = "number", order = "desc", offset = 0;
  let trials = [];          // every finished trial seen, for the figures
  const seen = new Set();   // their numbers (the event stream replays from its start)
  let bestSoFar = null;

  const api = (path, opts = {}) => fetch(path, Object.assign({credentials: "same-origin",
    headers: Object.assign({"X-CSRF-Token": csrf, "Content-Type": "application/json"},
                           opts.headers || {})}, opts)).then(async r => {
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.message || r.statusText);
      return body;
    });

  // ------------------------------------------------------------------ figures
  const cls = t => t.state === "pruned" ? 2 : (t.feasible ? 0 : 1);
  const traceOf = t => [t.tax, t.reward === null ? null : t.reward, t.number];
  function scatterTraces() {
    const mk = (name, symbol, color) => ({type: "scattergl", mode: "markers", name,
      x: [], y: [], customdata: [], marker: {symbol, color, size: 8},
      hovertemplate: "trial %{customdata}<br>tax %{x:.4f}<br>reward %{y:.4g}<extra>" + name + "</extra>"});
    return [mk("feasible", "circle", "#137333"), mk("over budget", "x", "#b3261e"),
            mk("pruned (stage 1, no reward: drawn at 0)", "triangle-down-open", "#888"),
            {type: "scatter", mode: "lines+markers", name: "uniform α (vanilla averaging)",
             x: [], y: [], line: {dash: "dot", color: "#0a58ca"}, marker: {symbol: "square"}},
            {type: "scatter", mode: "markers", name: "best", x: [], y: [],
             marker: {symbol: "star", size: 16, color: "#f5a300", line: {color: "#000", width: 1}}}];
  }
  function drawAll() {
    const tr = scatterTraces();
    for (const t of trials) {
      const [x, y, n] = traceOf(t);
      const k = cls(t);
      tr[k].x.push(x); tr[k].y.push(k === 2 ? 0 : y); tr[k].customdata.push(n);
    }
    const uni = trials.filter(t => t.kind === "uniform" && t.reward !== null)
      .sort((a, b) => a.uniform_ratio - b.uniform_ratio);
    tr[3].x = uni.map(t => t.tax); tr[3].y = uni.map(t => t.reward);
    tr[3].text = uni.map(t => "α=" + t.uniform_ratio);
    const best = bestOf(trials);
    if (best) { tr[4].x = [best.tax]; tr[4].y = [best.reward]; }
    Plotly.react("scatter", tr, {title: {text: "reward vs tax (budget " + budget + ")"},
      xaxis: {title: {text: "tax"}}, yaxis: {title: {text: "reward"}}, height: 360,
      shapes: [{type: "line", x0: budget, x1: budget, yref: "paper", y0: 0, y1: 1,
                line: {dash: "dash", color: "#b3261e"}}]}, {displaylogo: false});
    const sorted = trials.slice().sort((a, b) => a.number - b.number);
    let run = null; const xs = [], ys = [];
    for (const t of sorted) {
      if (t.feasible && t.reward !== null && (run === null || t.reward > run)) run = t.reward;
      xs.push(t.number); ys.push(run);
    }
    bestSoFar = run;
    Plotly.react("best-so-far", [{type: "scattergl", mode: "lines", x: xs, y: ys,
      name: "best feasible reward so far", line: {shape: "hv"}}],
      {title: {text: "best feasible reward so far"}, xaxis: {title: {text: "trial"}}, height: 300}, {displaylogo: false});
    drawProfile(best, uni);
  }
  function bestOf(ts) {
    let b = null;
    for (const t of ts) if (t.feasible && t.reward !== null && (!b || t.reward > b.reward)) b = t;
    return b;
  }
  function drawProfile(trial, uni) {
    const traces = [];
    if (trial) traces.push({type: "scatter", mode: "lines+markers", name: "trial " + trial.number,
      x: Object.keys(trial.ratios), y: Object.values(trial.ratios), line: {shape: "hvh"}});
    const bu = bestOf(uni || []);
    if (trial && bu) traces.push({type: "scatter", mode: "lines", name: "best uniform α = " + bu.uniform_ratio,
      x: Object.keys(trial.ratios), y: Object.keys(trial.ratios).map(() => bu.uniform_ratio),
      line: {dash: "dot"}});
    Plotly.react("profile", traces, {title: {text: "ratio profile (α = weight on the aligned model)"},
      yaxis: {title: {text: "α"}, range: [0, 1]}, height: 300}, {displaylogo: false});
  }
  function addTrial(t) {
    if (seen.has(t.number)) return;
    seen.add(t.number);
    trials.push(t);
    const k = cls(t), [x, y, n] = traceOf(t);
    Plotly.extendTraces("scatter", {x: [[x]], y: [[k === 2 ? 0 : y]], customdata: [[n]]}, [k]);
    if (t.kind === "uniform" || (t.feasible && t.reward !== null && (bestSoFar === null || t.reward > bestSoFar)))
      drawAll();  // the baseline curve or the best changed: redraw those
    else
      Plotly.extendTraces("best-so-far", {x: [[t.number]], y: [[bestSoFar]]}, [0]);
  }

  // ------------------------------------------------------------------ table
  const fmt = (v, d) => v === null || v === undefined ? "—" : (+v).toPrecision(d);
  function row(t) {
    const tr = document.createElement("tr");
    tr.dataset.trial = t.number;
    const cells = [t.number, t.kind, Object.entries(t.ratios).map(([k, v]) => k + "=" + v.toFixed(3)).join(" "),
      t.state === "pruned" ? "pruned" : fmt(t.reward, 4), fmt(t.tax, 4),
      Object.entries(t.metrics).map(([k, v]) => k + " " + fmt(v, 3)).join(", "),
      t.stage, fmt(t.merge_seconds, 2), fmt(t.eval_seconds, 3)];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    tr.addEventListener("click", () => drawProfile(t, trials.filter(u => u.kind === "uniform")));
    return tr;
  }
  async function loadPage() {
    const body = await api(`/v1/jobs/${jobId}/trials?sort=${sort}&order=${order}&limit=${PAGE}&offset=${offset}`);
    const tbody = document.querySelector("#trials tbody");
    tbody.replaceChildren(...body.data.map(row));
    document.getElementById("trial-count").textContent = body.count;
    document.getElementById("page").textContent = `${offset + 1}–${Math.min(offset + PAGE, body.count)} of ${body.count}`;
  }
  document.querySelectorAll("#trials th[data-sort]").forEach(th => th.addEventListener("click", () => {
    order = sort === th.dataset.sort && order === "desc" ? "asc" : "desc";
    sort = th.dataset.sort; offset = 0; loadPage();
  }));
  document.getElementById("prev").onclick = () => { offset = Math.max(0, offset - PAGE); loadPage(); };
  document.getElementById("next").onclick = () => { offset += PAGE; loadPage(); };

  // ------------------------------------------------------------------ actions
  const say = m => { const el = document.getElementById("action-result"); if (el) el.textContent = m; };
  const cancel = document.getElementById("cancel");
  if (cancel) cancel.onclick = () => api(`/v1/jobs/${jobId}/cancel`, {method: "POST"})
    .then(j => say("cancel requested: " + j.status)).catch(e => say(e.message));
  const exp = document.getElementById("export");
  if (exp) exp.onclick = () => api(`/v1/jobs/${jobId}/export`, {method: "POST",
      body: JSON.stringify({dir: document.getElementById("export-dir").value || null})})
    .then(s => say("export " + s.status + ": " + s.dir)).catch(e => say(e.message));

  // ------------------------------------------------------------------ live
  async function start() {
    for (let off = 0; ; off += 1000) {  // every trial for the figures, a page at a time
      const body = await api(`/v1/jobs/${jobId}/trials?limit=1000&offset=${off}`);
      trials.push(...body.data);
      body.data.forEach(t => seen.add(t.number));
      if (trials.length >= body.count || body.data.length === 0) break;
    }
    drawAll();
    await loadPage();
    const es = new EventSource(`/v1/jobs/${jobId}/events`);
    es.addEventListener("trial", e => {
      const t = JSON.parse(e.data); addTrial(t);
      document.getElementById("progress").textContent = `${t.trials_finished}/${t.n_trials}`;
      if (t.best_reward !== null) document.getElementById("best").textContent = (+t.best_reward).toPrecision(4);
      if (t.best_tax !== null) document.getElementById("best-tax").textContent = (+t.best_tax).toFixed(4);
      if (t.gain !== null) document.getElementById("gain").textContent = (t.gain >= 0 ? "+" : "") + (+t.gain).toPrecision(4);
      if (offset === 0 && sort === "number" && order === "desc") {
        const tbody = document.querySelector("#trials tbody");
        if (!tbody.querySelector(`tr[data-trial="${t.number}"]`)) tbody.prepend(row(t));
      }
    });
    const setStatus = s => { const el = document.getElementById("status"); el.textContent = s; el.className = "status " + s; };
    es.addEventListener("status", e => setStatus(JSON.parse(e.data).status));
    es.addEventListener("job", e => setStatus(JSON.parse(e.data).status));
    es.addEventListener("export", e => { const d = JSON.parse(e.data);
      document.getElementById("export-state").textContent = "export: " + d.status + " " + (d.dir || d.error || ""); });
  }
  start().catch(e => say(e.message));
})();
