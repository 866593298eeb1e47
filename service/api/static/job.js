// The live job page. Figures come from the job's trial points (one columnar response, no
// ratios), the table from the paged trials endpoint; the job's server-sent events keep both
// current (EventSource reconnects with Last-Event-ID by itself). New points are appended to
// the figures (Plotly.extendTraces); only a new best or baseline point redraws. The best
// trial and the uniform-α points carry ±1 SE error bars; once the job has its result, the
// "best" is its answer (chosen on the validation data) and the held-out panel and the flags
// banner, and the stages panel (which stage found the answer, evaluations per stage), are
// swapped in from /ui/jobs/{id}/answer (server-rendered, as on first load).
"use strict";
(function () {
  const H = window.hmaopt;
  const root = document.getElementById("job");
  const jobId = root.dataset.job, budget = parseFloat(root.dataset.budget);
  let layout = JSON.parse(document.getElementById("layout").textContent);
  const PAGE = 50;
  let sort = "number", order = "desc", offset = 0;
  const trials = [];        // every finished trial seen (points: no ratios)
  const seen = new Set();   // their numbers (the event stream replays from its start)
  let best = null;          // the best feasible point, or the job's answer once it has one
  let shown = null;         // the trial (with ratios) the profile shows; null: the best
  const full = new Map();   // trials with ratios, by number

  // ------------------------------------------------------------------ figures
  function scatterTraces() {
    const mk = (name, symbol, color) => ({type: "scattergl", mode: "markers", name,
      x: [], y: [], customdata: [], marker: {symbol, color, size: 8},
      hovertemplate: "trial %{customdata}<br>tax %{x:.4f}<br>reward %{y:.4g}<extra>" + name + "</extra>"});
    const tr = [mk("feasible", "circle", "#137333"), mk("over budget", "x", "#b3261e"),
      mk("pruned (stage 1, no reward: drawn at 0)", "triangle-down-open", "#888")];
    for (const t of trials) {
      const k = H.cls(t);
      tr[k].x.push(t.tax); tr[k].y.push(k === 2 ? 0 : t.reward); tr[k].customdata.push(t.number);
    }
    const uni = H.uniform(trials);
    tr.push({type: "scatter", mode: "lines+markers", name: "uniform α (vanilla averaging) ±1 SE",
      x: uni.map(t => t.tax), y: uni.map(t => t.reward), customdata: uni.map(t => t.number),
      text: uni.map(t => "α=" + t.uniform_ratio + seText(t)), line: {dash: "dot", color: "#0a58ca"},
      error_x: H.errorBars(uni, "tax_se", "#0a58ca"), error_y: H.errorBars(uni, "reward_se", "#0a58ca"),
      marker: {symbol: "square"}, hovertemplate: "%{text}<br>tax %{x:.4f}<br>reward %{y:.4g}<extra>uniform</extra>"});
    const b = best ? [best] : [];
    tr.push({type: "scatter", mode: "markers", name: answerTrial() === null ? "best ±1 SE" : "answer ±1 SE",
      x: b.map(t => t.tax), y: b.map(t => t.reward), customdata: b.map(t => t.number),
      text: b.map(seText), error_x: H.errorBars(b, "tax_se", "#000"), error_y: H.errorBars(b, "reward_se", "#000"),
      hovertemplate: "trial %{customdata}%{text}<br>tax %{x:.4f}<br>reward %{y:.4g}<extra>best</extra>",
      marker: {symbol: "star", size: 16, color: "#f5a300", line: {color: "#000", width: 1}}});
    return tr;
  }
  const seText = t => (t.reward_se !== null && t.reward_se !== undefined ? "<br>reward " + H.pm(t.reward_se) : "") +
    (t.tax_se !== null && t.tax_se !== undefined ? "<br>tax " + H.pm(t.tax_se) : "");
  // the trial numbers the result chose (held-out panel's data-answer / data-uniform), or null
  const chosen = key => { const v = document.getElementById("holdout").dataset[key]; return v ? +v : null; };
  const answerTrial = () => chosen("answer");
  const pick = (n, fallback) => (n !== null && trials.find(t => t.number === n)) || fallback;
  function drawAll() {
    best = pick(answerTrial(), null) || H.bestOf(trials);
    Plotly.react("scatter", scatterTraces(), Object.assign(H.below(440), {
      title: {text: "reward vs tax (budget " + budget + ")"},
      xaxis: {title: {text: "tax (dashed line: the budget)"}}, yaxis: {title: {text: "reward"}},
      shapes: [{type: "line", x0: budget, x1: budget, yref: "paper", y0: 0, y1: 1,
                line: {dash: "dash", color: "#b3261e"}}]}), H.config);
    setTimeout(drawSecondary, 0);  // the scatter shows first
  }
  function drawSecondary() {
    const curve = H.bestSoFar(trials);
    Plotly.react("best-so-far", [{type: "scatter", mode: "lines", x: curve.x, y: curve.y,
      name: "best feasible reward so far", line: {shape: "hv"}}],
      {title: {text: "best feasible reward so far"}, xaxis: {title: {text: "trial"}},
       yaxis: {title: {text: "best feasible reward"}}, height: 360}, H.config);
    drawProfile();
    performance.mark("hmaopt:figures");
  }
  async function trialWithRatios(number) {
    if (!full.has(number)) full.set(number, await H.api(`/v1/jobs/${jobId}/trials/${number}`));
    return full.get(number);
  }
  async function drawProfile() {
    const traces = [];
    const target = shown || (best && await trialWithRatios(best.number));
    if (target) traces.push(...H.profile(target.ratios, layout,
      (target === shown ? "trial " : "best trial ") + target.number));
    const bu = pick(chosen("uniform"), null) || H.bestOf(H.uniform(trials));
    if (bu && traces.length) traces.push({type: "scatter", mode: "lines", name: "best uniform α = " + bu.uniform_ratio,
      x: traces[0].x, y: traces[0].x.map(() => bu.uniform_ratio), line: {dash: "dot", color: "#0a58ca"}});
    Plotly.react("profile", traces, H.profileLayout(layout), H.config);
  }
  function addTrial(t) {
    if (seen.has(t.number)) return;
    seen.add(t.number);
    full.set(t.number, t);
    trials.push(t);
    if (t.kind === "uniform" || (t.feasible && t.reward !== null && (best === null || t.reward > best.reward)))
      return drawAll();  // the baseline curve or the best changed: redraw those
    const k = H.cls(t);
    Plotly.extendTraces("scatter", {x: [[t.tax]], y: [[k === 2 ? 0 : t.reward]], customdata: [[t.number]]}, [k]);
    if (document.getElementById("best-so-far").data)  // else its first drawing is pending
      Plotly.extendTraces("best-so-far", {x: [[t.number]], y: [[best ? best.reward : null]]}, [0]);
  }

  // ------------------------------------------------------------------ table
  // the table's decimals: every number of a column with the same (SEs as rewards, taxes)
  const DIGITS = {ratio: 3, reward: 4, tax: 4, metric: 3, seconds: 2};
  function row(t) {
    const tr = document.createElement("tr");
    tr.dataset.trial = t.number;
    const D = DIGITS, num = "num";
    // a cell: [text, class ("num": a number, right-aligned), its standard error or null]
    const cells = [[t.number, num], [t.kind],
      [Object.entries(t.ratios).map(([k, v]) => k + "=" + v.toFixed(D.ratio)).join(" ")],
      t.state === "pruned" ? ["pruned", "num pruned"] : [H.fixed(t.reward, D.reward), num, t.reward_se],
      [H.fixed(t.tax, D.tax), num, t.tax_se],
      [Object.entries(t.metrics).map(([k, v]) => k + " " + H.fixed(v, D.metric)).join(", ")],
      [t.stage, num], [H.fixed(t.merge_seconds, D.seconds), num], [H.fixed(t.eval_seconds, D.seconds), num]];
    for (const [text, cls, se] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      if (se !== null && se !== undefined) {
        const small = document.createElement("small"); small.className = "se";
        small.textContent = "± " + H.fixed(se, D.reward); td.append(" ", small);
      }
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => { shown = t; drawProfile(); });
    return tr;
  }
  async function loadPage() {
    const body = await H.api(`/v1/jobs/${jobId}/trials?sort=${sort}&order=${order}&limit=${PAGE}&offset=${offset}`);
    body.data.forEach(t => full.set(t.number, t));
    document.querySelector("#trials tbody").replaceChildren(...body.data.map(row));
    document.getElementById("trial-count").textContent = body.count;
    document.getElementById("page").textContent = body.count ?
      `${offset + 1}–${Math.min(offset + PAGE, body.count)} of ${body.count}` : "none yet";
    document.getElementById("prev").disabled = offset === 0;
    document.getElementById("next").disabled = offset + PAGE >= body.count;
  }
  document.querySelectorAll("#trials th[data-sort]").forEach(th => th.addEventListener("click", () => {
    order = sort === th.dataset.sort && order === "desc" ? "asc" : "desc";
    sort = th.dataset.sort; offset = 0; loadPage();
  }));
  document.getElementById("prev").onclick = () => { offset = Math.max(0, offset - PAGE); loadPage(); };
  document.getElementById("next").onclick = () => { offset += PAGE; loadPage(); };

  // ------------------------------------------------------------------ actions
  const say = m => { (document.getElementById("action-result") || document.getElementById("page-error")).textContent = m; };
  const cancel = document.getElementById("cancel");
  if (cancel) cancel.onclick = () => H.api(`/v1/jobs/${jobId}/cancel`, {method: "POST"})
    .then(j => say("cancel requested: " + j.status)).catch(e => say(e.message));
  const exp = document.getElementById("export");
  if (exp) exp.onclick = () => H.api(`/v1/jobs/${jobId}/export`, {method: "POST",
      body: JSON.stringify({dir: document.getElementById("export-dir").value || null})})
    .then(s => say("export " + s.status + ": " + s.dir)).catch(e => say(e.message));

  // ------------------------------------------------------------------ the answer
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  let answerAsked = false;
  // The flags banner, the held-out panel and the stages as the server renders them, once
  // the job ended.
  async function refreshAnswer() {
    if (answerAsked) return;
    answerAsked = true;
    const r = await fetch(`/ui/jobs/${jobId}/answer`, {credentials: "same-origin"});
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    for (const id of ["flags-slot", "holdout", "stages"]) {
      const fresh = doc.getElementById(id);
      if (fresh) document.getElementById(id).replaceWith(document.adoptNode(fresh));
    }
    if (document.getElementById("scatter").data) drawAll();  // the answer's star
  }

  // ------------------------------------------------------------------ live
  // The data is asked for at once; this script runs before plotly.js has loaded (the page
  // includes it first), and the figures wait for the document (plotly.js included).
  const pointsP = H.api(`/v1/jobs/${jobId}/points`), pageP = loadPage();
  const parsed = new Promise(r => document.readyState === "loading" ?
    document.addEventListener("DOMContentLoaded", r) : r());
  async function start() {
    const [points] = await Promise.all([pointsP, pageP]);
    performance.mark("hmaopt:data");  // the marks time the first view (bench/bench_ui.py)
    await parsed;
    performance.mark("hmaopt:scripts");
    for (const t of H.rows(points)) { trials.push(t); seen.add(t.number); }
    drawAll();
    performance.mark("hmaopt:scatter");
    document.getElementById("scatter").on("plotly_click", async ev => {
      const n = ev.points[0] && ev.points[0].customdata;
      if (n === undefined || n === null) return;
      shown = await trialWithRatios(n); drawProfile();
    });
    // the events after the points just read (all of them when Redis did not answer)
    const es = new EventSource(`/v1/jobs/${jobId}/events` + (points.cursor ? `?since=${points.cursor}` : ""));
    let layoutAsked = false;
    es.addEventListener("trial", e => {
      const t = JSON.parse(e.data); addTrial(t);
      if (!layout && !layoutAsked) {  // written before any trial: its event came before our cursor
        layoutAsked = true;
        H.api(`/v1/jobs/${jobId}`).then(j => { if (j.layout) { layout = j.layout; drawProfile(); } });
      }
      document.getElementById("progress").textContent = `${t.trials_finished}/${t.n_trials}`;
      if (t.best_reward !== null) document.getElementById("best").textContent = (+t.best_reward).toPrecision(4);
      if (t.best_tax !== null) document.getElementById("best-tax").textContent = (+t.best_tax).toFixed(4);
      if (t.gain !== null) document.getElementById("gain").textContent = (t.gain >= 0 ? "+" : "") + (+t.gain).toPrecision(4);
      if (offset === 0 && sort === "number" && order === "desc") {
        const tbody = document.querySelector("#trials tbody");
        if (!tbody.querySelector(`tr[data-trial="${t.number}"]`)) tbody.prepend(row(t));
        while (tbody.children.length > PAGE) tbody.lastChild.remove();
      }
    });
    es.addEventListener("layout", e => { layout = JSON.parse(e.data); drawProfile(); });
    const setStatus = s => {
      const el = document.getElementById("status"); el.textContent = s; el.className = "status " + s;
      if (TERMINAL.has(s) && document.getElementById("holdout").dataset.result !== "1") refreshAnswer();
    };
    es.addEventListener("status", e => setStatus(JSON.parse(e.data).status));
    es.addEventListener("job", e => setStatus(JSON.parse(e.data).status));
    es.addEventListener("export", e => { const d = JSON.parse(e.data);
      document.getElementById("export-state").textContent = "export: " + d.status + " " + (d.dir || d.error || ""); });
  }
  start().catch(e => say(e.message));
})();
