// A pipeline's runs over time: the candidate's reward (marker: the decision), its tax against
// the budget, its gain over the best uniform α, and the champion's reward it was held to.
"use strict";
(function () {
  const H = window.hmaopt;
  const {budget, runs} = JSON.parse(document.getElementById("runs-data").textContent);
  const parsed = new Promise(r => document.readyState === "loading" ?
    document.addEventListener("DOMContentLoaded", r) : r());
  parsed.then(() => {
    const done = runs.filter(r => r.reward !== null);
    const mk = (decision, symbol, color) => {
      const sel = done.filter(r => r.decision === decision);
      return {type: "scatter", mode: "markers", name: "reward, " + decision, x: sel.map(r => r.at),
        y: sel.map(r => r.reward), text: sel.map(r => r.reason || ""), customdata: sel.map(r => r.id),
        marker: {symbol, color, size: 11}, hovertemplate: "%{x}<br>reward %{y:.4g}<br>%{text}<extra></extra>"};
    };
    const traces = [
      {type: "scatter", mode: "lines", name: "reward", x: done.map(r => r.at), y: done.map(r => r.reward),
       line: {color: "#999", width: 1}, hoverinfo: "skip", showlegend: false},
      mk("promoted", "star", "#f5a300"), mk("kept", "circle-open", "#555"),
      {type: "scatter", mode: "lines+markers", name: "champion's reward (compared)",
       x: done.map(r => r.at), y: done.map(r => r.champion_reward), line: {dash: "dot", color: "#0a58ca"}},
      {type: "scatter", mode: "lines+markers", name: "gain over uniform α", x: done.map(r => r.at),
       y: done.map(r => r.gain), yaxis: "y2", line: {color: "#137333"}},
      {type: "scatter", mode: "lines+markers", name: "tax", x: done.map(r => r.at), y: done.map(r => r.tax),
       yaxis: "y3", line: {color: "#b3261e"}},
    ];
    const skipped = runs.filter(r => r.status === "skipped" || r.status === "failed");
    traces.push({type: "scatter", mode: "markers", name: "skipped / failed", x: skipped.map(r => r.at),
      y: skipped.map(() => 0), yaxis: "y3", text: skipped.map(r => r.reason || r.status),
      marker: {symbol: "x", color: "#888"}, hovertemplate: "%{x}<br>%{text}<extra></extra>"});
    Plotly.react("runs-chart", traces, Object.assign(H.below(560, 2), {
      title: {text: "runs over time<br><span style='font-size: 12px'>★ promoted, ○ kept; dashed: the tax budget</span>"},
      margin: {t: 64, b: 114},
      xaxis: {anchor: "y3", title: {text: "scheduled run"}},
      yaxis: {title: {text: "reward"}, domain: [0.55, 1]},
      yaxis2: {title: {text: "gain"}, domain: [0.3, 0.5]},
      yaxis3: {title: {text: "tax"}, domain: [0, 0.25]},
      shapes: [{type: "line", xref: "paper", x0: 0, x1: 1, yref: "y3", y0: budget, y1: budget,
                line: {dash: "dash", color: "#b3261e"}}]}), H.config);
  });
})();
