// The editor's DOM: its style sheet and its controls (toolbar, canvas, box fields, status line).
// Only exports (see model.js); the style sheet is added when the first editor is built.
import { GRID_STEPS } from "./model.js";

/** The editor's least height: the canvas renderer asks the widget (getMinHeight), the Vue node renderer sizes
 * the element by its content and style. */
export const MIN_HEIGHT = 320;

const CSS = `
.cones2-layout { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; font: 12px sans-serif;
  color: var(--input-text, #ddd); overflow: hidden; min-height: ${MIN_HEIGHT}px; }
.cones2-layout .c2-row { display: flex; gap: 4px; align-items: center; flex-wrap: wrap; min-height: 22px; }
.cones2-layout .c2-stage { position: relative; flex: 1 1 auto; min-height: 60px; background: rgba(0,0,0,0.25);
  border-radius: 4px; overflow: hidden; }
.cones2-layout canvas { position: absolute; outline: none; touch-action: none; }
.cones2-layout input, .cones2-layout button { background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 4px; font: 12px sans-serif; padding: 1px 4px;
  box-sizing: border-box; height: 22px; }
.cones2-layout button { cursor: pointer; }
.cones2-layout label { display: inline-flex; align-items: center; gap: 3px; }
.cones2-layout input[type=checkbox] { height: auto; margin: 0; }
.cones2-layout button:disabled, .cones2-layout input:disabled { opacity: 0.45; cursor: default; }
.cones2-layout .c2-subject { flex: 1 1 80px; min-width: 60px; }
.cones2-layout .c2-num { width: 58px; }
.cones2-layout .c2-info { opacity: 0.7; margin-left: auto; white-space: nowrap; }
.cones2-layout .c2-status { opacity: 0.7; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-height: 15px; }
.cones2-layout .c2-status.c2-error { color: #ff6b6b; opacity: 1; }
.cones2-layout .c2-status.c2-refused { color: #f5a623; opacity: 1; }
.cones2-layout .c2-time-row[hidden] { display: none; }
.cones2-layout .c2-time { flex: 1 1 120px; min-width: 80px; height: 18px; padding: 0; }
.cones2-layout .c2-time-label { width: 44px; font-variant-numeric: tabular-nums; white-space: nowrap; }
`;

let styleAdded = false;
function addStyle() {
  if (styleAdded) return;
  styleAdded = true;
  const style = document.createElement("style");
  style.textContent = CSS;
  document.head.appendChild(style);
}

export function el(tag, props = {}, parent = null) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  if (parent) parent.appendChild(e);
  return e;
}

function checkbox(parent, className, text, title) {
  const label = el("label", { title }, parent);
  const box = el("input", { type: "checkbox", className }, label);
  label.append(` ${text}`);
  return box;
}

let panelCount = 0;

/** Builds one editor's controls; returns {root, snapBox, mapsBox, trackBox, delButton, clearButton, info, stage,
 * canvas, timeRow, timeSlider, timeLabel, keyList, delKeyButton, datalist, subjectInput, weightInput,
 * numInputs: {x, y, w, h}, status}. */
export function buildPanel() {
  addStyle();
  const n = ++panelCount;   // ids of the editor's datalists: unique in the page
  const p = {};
  const root = p.root = el("div", { className: "cones2-layout" });

  const bar = el("div", { className: "c2-row" }, root);
  p.snapBox = checkbox(bar, "c2-snap", "snap", `Snap edges to a ${GRID_STEPS}×${GRID_STEPS} grid`);
  p.mapsBox = checkbox(bar, "c2-maps", "maps", "Show the attention maps of the last run under the boxes, and each "
    + "subject's in-region share in its label (needs a Cones2 Attention Maps node fed by this node's MODEL)");
  p.trackBox = checkbox(bar, "c2-track", "track", "Video: move boxes over the clip. Shows a time slider under the "
    + "drawing; moving or resizing a box at a time sets its keyframe there (image models use the boxes at t = 0)");
  p.delButton = el("button", { textContent: "Delete box", className: "c2-delete",
    title: "Remove the selected box (Delete / Backspace)" }, bar);
  p.clearButton = el("button", { textContent: "Clear", className: "c2-clear", title: "Remove all boxes" }, bar);
  p.info = el("span", { className: "c2-info" }, bar);

  p.stage = el("div", { className: "c2-stage" }, root);
  p.canvas = el("canvas", { tabIndex: 0, className: "c2-canvas" }, p.stage);

  // the clip's time (shown with "track"): 0 = the first frame, 1 = the last
  const timeRow = p.timeRow = el("div", { className: "c2-row c2-time-row", hidden: true }, root);
  p.timeLabel = el("span", { className: "c2-time-label", title: "Time in the clip: 0 = first frame, 1 = last" },
    timeRow);
  p.keyList = el("datalist", { id: `cones2-layout-${n}-keys` }, root);
  p.timeSlider = el("input", { type: "range", className: "c2-time", min: "0", max: "1", step: "0.01", value: "0",
    title: "Time in the clip; the drawing shows the boxes at this time, the ticks are the selected box's keyframes" },
  timeRow);
  p.timeSlider.setAttribute("list", p.keyList.id);
  p.delKeyButton = el("button", { textContent: "Delete key", className: "c2-delkey",
    title: "Remove the selected box's keyframe at this time (a box left with one keyframe holds still there)" },
  timeRow);

  const row = el("div", { className: "c2-row" }, root);
  p.datalist = el("datalist", { id: `cones2-layout-${n}-words` }, root);
  p.subjectInput = el("input", { type: "text", className: "c2-subject", placeholder: "subject word",
    title: "The word of the prompt this box places (e.g. dog)" }, row);
  p.subjectInput.setAttribute("list", p.datalist.id);
  p.weightInput = el("input", { type: "number", className: "c2-num c2-weight", step: "0.1",
    placeholder: "weight", title: "Strength for this box; empty = the node's positive_weight" }, row);
  const row2 = el("div", { className: "c2-row" }, root);
  p.numInputs = {};
  for (const k of ["x", "y", "w", "h"]) {
    const label = el("label", {}, row2);
    label.append(`${k} `);
    p.numInputs[k] = el("input", { type: "number", className: `c2-num c2-${k}`, step: "0.01", min: "0",
      max: "1", title: `${k} as a fraction of the image` }, label);
  }
  p.status = el("div", { className: "c2-status" }, root);
  return p;
}
