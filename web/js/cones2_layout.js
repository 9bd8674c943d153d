// Cones2 layout editor: a canvas on "Cones2 Layout Guidance" for drawing one box per subject.
//
// The node's `layout` STRING widget holds the layout JSON and stays the single source of truth:
// every canvas edit rewrites that text, and every change of the text (typing, loading a workflow,
// pasting a node, undo) redraws the canvas. The editor itself is a DOM widget that is never
// serialised, so workflows, copies and API prompts carry only the JSON text. No network access,
// no images stored anywhere.
//
// Attention maps: when a "Cones2 Attention Maps" node whose `model` input comes straight from this node
// finishes, its ui entry `cones2_maps` (the largest grid's maps, one per subject, from the frontend's own
// websocket "executed" event) is kept in memory on this editor; the "maps" toggle draws them under the boxes
// and adds each subject's in-region share to its label. They are never written to the layout or the workflow.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "Cones2LayoutGuidance";
const MAPS_NODE_TYPE = "Cones2AttentionMaps";
const MAPS_UI_KEY = "cones2_maps";
const MAPS_ALPHA = 0.8;       // opacity of the heatmaps (each pixel's own alpha is the map's value)
const LAYOUT_WIDGET = "layout";
const EDITOR_WIDGET = "cones2_layout_editor";
const LAYOUT_VERSION = 1;
const PALETTE = [
  "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#aaffc3", "#808000", "#ffd8b1",
];
const GRID_STEPS = 16;        // snapping grid: 1/16 of the image on each axis
const HANDLE_PX = 7;          // grab distance for edges and corners, in screen pixels
const DRAG_START_PX = 3;      // a press that moves less than this is a click
const MIN_BOX_PX = 4;         // smallest box, in screen pixels of the editor
const DECIMALS = 1e4;         // coordinates are stored with 4 decimals
const STOPWORDS = new Set((
  "a an the and or of on in at to with by for from into onto under over near next beside behind " +
  "front back top left right is are be this that his her its their photo picture image style very " +
  "high quality detailed best masterpiece"
).split(" "));
const BOX_KEYS = ["subject", "x", "y", "w", "h", "weight"];

const round = (v) => Math.round(v * DECIMALS) / DECIMALS;
const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
const isNum = (v) => typeof v === "number" && Number.isFinite(v);

/** Parse layout text leniently for display: {boxes, canvas, extra} or {error}. Empty text = no boxes. */
export function parseLayoutText(text) {
  if (typeof text !== "string" || !text.trim()) return { boxes: [], canvas: null, extra: {} };
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    return { error: `JSON error: ${err.message}` };
  }
  if (!data || typeof data !== "object" || Array.isArray(data)) return { error: "the layout must be a JSON object" };
  const raw = data.boxes ?? [];
  if (!Array.isArray(raw)) return { error: "'boxes' must be a list" };
  const boxes = [];
  for (const [i, b] of raw.entries()) {
    if (!b || typeof b !== "object" || Array.isArray(b)) return { error: `box ${i} is not an object` };
    if (!["x", "y", "w", "h"].every((k) => isNum(b[k]))) return { error: `box ${i} needs numbers x, y, w, h` };
    const x = clamp(b.x, 0, 1), y = clamp(b.y, 0, 1);
    const box = {
      subject: typeof b.subject === "string" ? b.subject : "",
      x, y, w: clamp(b.w, 0, 1 - x), h: clamp(b.h, 0, 1 - y),
      extra: {},
    };
    if (isNum(b.weight)) box.weight = b.weight;
    for (const [k, v] of Object.entries(b)) if (!BOX_KEYS.includes(k)) box.extra[k] = v;
    boxes.push(box);
  }
  let canvas = null;
  const c = data.canvas;
  if (c && isNum(c.width) && isNum(c.height) && c.width > 0 && c.height > 0) canvas = { width: c.width, height: c.height };
  const extra = {};
  for (const [k, v] of Object.entries(data)) if (!["version", "boxes", "canvas"].includes(k)) extra[k] = v;
  return { boxes, canvas, extra };
}

function boxToJson(b) {
  const x = round(b.x), y = round(b.y);
  const item = { subject: b.subject.trim(), x, y, w: round(round(b.x + b.w) - x), h: round(round(b.y + b.h) - y) };
  if (isNum(b.weight)) item.weight = b.weight;
  Object.assign(item, b.extra || {});
  return "{" + Object.entries(item).map(([k, v]) => `${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(", ") + "}";
}

/** The JSON text for a layout: one box per line, unknown keys kept. */
export function formatLayout(boxes, canvas, extra) {
  let head = `{"version": ${LAYOUT_VERSION}`;
  for (const [k, v] of Object.entries(extra || {})) head += `, ${JSON.stringify(k)}: ${JSON.stringify(v)}`;
  if (canvas) head += `, "canvas": {"width": ${canvas.width}, "height": ${canvas.height}}`;
  if (!boxes.length) return head + `, "boxes": []}`;
  return head + `, "boxes": [\n  ` + boxes.map(boxToJson).join(",\n  ") + `\n]}`;
}

function widgetByName(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function inputSlot(node, name) {
  return node?.inputs?.findIndex((i) => i.name === name) ?? -1;
}

function sizeOf(node) {
  const w = widgetByName(node, "width")?.value, h = widgetByName(node, "height")?.value;
  return isNum(w) && isNum(h) && w > 0 && h > 0 ? { width: w, height: h } : null;
}

function graphNodes() {
  const g = app.graph;
  return g?.nodes ?? g?._nodes ?? [];
}

/** The generation size: the latent image feeding a sampler downstream of this node, else the first empty
 * latent in the graph; null when none is known. */
function latentSize(node) {
  try {
    for (let slot = 0; slot < (node.outputs?.length ?? 0); slot++) {
      for (const target of node.getOutputNodes(slot) ?? []) {
        const s = inputSlot(target, "latent_image");
        if (s < 0) continue;
        const size = sizeOf(target.getInputNode(s));
        if (size) return size;
      }
    }
    for (const n of graphNodes()) {
      if (/EmptyLatent|Empty.*Latent/i.test(n.type ?? "")) {
        const size = sizeOf(n);
        if (size) return size;
      }
    }
  } catch (err) {
    // a graph being rebuilt; keep whatever size was known
  }
  return null;
}

/** Words of the prompt that feeds this node's conditioning, plus subjects of Load Residual nodes. */
function promptWords(node) {
  const words = [];
  try {
    let n = node, hops = 0;
    while (n && hops++ < 6) {
      const slot = inputSlot(n, "conditioning");
      if (slot < 0) break;
      n = n.getInputNode(slot);
      const text = widgetByName(n, "text")?.value;
      if (typeof text === "string") {
        words.push(...(text.match(/[\p{L}][\p{L}\p{N}_'-]*/gu) ?? []));
        break;
      }
    }
    for (const g of graphNodes()) {
      if (g.type === "Cones2LoadResidual") {
        const s = widgetByName(g, "subject")?.value;
        if (typeof s === "string" && s.trim()) words.unshift(s.trim());
      }
    }
  } catch (err) {
    // ignore: suggestions are a convenience
  }
  const seen = new Set();
  return words.filter((w) => {
    const k = w.toLowerCase();
    if (STOPWORDS.has(k) || seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

function checkState() {
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState();
  } catch (err) {
    // no change tracker (older frontend): the frontend's own mouseup/keyup checks still run
  }
}

let styleInjected = false;
function injectStyle() {
  if (styleInjected) return;
  styleInjected = true;
  const style = document.createElement("style");
  style.textContent = `
.cones2-layout { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; font: 12px sans-serif;
  color: var(--input-text, #ddd); overflow: hidden; }
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
`;
  document.head.appendChild(style);
}

let editorCount = 0;

class LayoutEditor {
  constructor(node, layoutWidget) {
    this.node = node;
    this.layoutWidget = layoutWidget;
    this.boxes = [];
    this.canvasSize = null;   // stored in the JSON
    this.extra = {};
    this.selected = -1;
    this.snap = false;
    this.error = null;
    this.lastText = null;
    this.drag = null;
    this.redraws = 0;
    this.aspect = 1;
    this.sizeSource = "square";
    this.cleanups = [];
    this.maps = null;         // the last run's attention maps (memory only): {node, prompt, subjects: [...]}
    this.showMaps = false;
    this.mapImages = new Map();
    this.mapEvents = 0;
    this.labels = [];
    this.id = `cones2-layout-${++editorCount}`;
    this.build();
    this.syncFromText(true);
  }

  // ---- DOM -------------------------------------------------------------------------------------------
  el(tag, props = {}, parent = null) {
    const e = document.createElement(tag);
    Object.assign(e, props);
    if (parent) parent.appendChild(e);
    return e;
  }

  listen(target, type, fn, opts) {
    target.addEventListener(type, fn, opts);
    this.cleanups.push(() => target.removeEventListener(type, fn, opts));
  }

  build() {
    injectStyle();
    const root = this.root = this.el("div", { className: "cones2-layout" });
    root.dataset.cones2Layout = "1";

    const bar = this.el("div", { className: "c2-row" }, root);
    const snapLabel = this.el("label", { title: `Snap edges to a ${GRID_STEPS}×${GRID_STEPS} grid` }, bar);
    this.snapBox = this.el("input", { type: "checkbox", className: "c2-snap" }, snapLabel);
    snapLabel.append(" snap");
    const mapsLabel = this.el("label", { title: "Show the attention maps of the last run under the boxes, and each "
      + "subject's in-region share in its label (needs a Cones2 Attention Maps node fed by this node's MODEL)" }, bar);
    this.mapsBox = this.el("input", { type: "checkbox", className: "c2-maps" }, mapsLabel);
    mapsLabel.append(" maps");
    this.delButton = this.el("button", { textContent: "Delete box", className: "c2-delete",
      title: "Remove the selected box (Delete / Backspace)" }, bar);
    this.clearButton = this.el("button", { textContent: "Clear", className: "c2-clear", title: "Remove all boxes" }, bar);
    this.info = this.el("span", { className: "c2-info" }, bar);

    this.stage = this.el("div", { className: "c2-stage" }, root);
    this.canvas = this.el("canvas", { tabIndex: 0, className: "c2-canvas" }, this.stage);
    this.ctx = this.canvas.getContext("2d");

    const row = this.el("div", { className: "c2-row" }, root);
    this.datalist = this.el("datalist", { id: `${this.id}-words` }, root);
    this.subjectInput = this.el("input", { type: "text", className: "c2-subject", placeholder: "subject word",
      title: "The word of the prompt this box places (e.g. dog)" }, row);
    this.subjectInput.setAttribute("list", this.datalist.id);
    this.weightInput = this.el("input", { type: "number", className: "c2-num c2-weight", step: "0.1",
      placeholder: "weight", title: "Strength for this box; empty = the node's positive_weight" }, row);
    const row2 = this.el("div", { className: "c2-row" }, root);
    this.numInputs = {};
    for (const k of ["x", "y", "w", "h"]) {
      const label = this.el("label", {}, row2);
      label.append(`${k} `);
      this.numInputs[k] = this.el("input", { type: "number", className: `c2-num c2-${k}`, step: "0.01", min: "0",
        max: "1", title: `${k} as a fraction of the image` }, label);
    }
    this.status = this.el("div", { className: "c2-status" }, root);

    // canvas interaction
    this.listen(this.canvas, "pointerdown", (e) => this.onPointerDown(e));
    this.listen(this.canvas, "pointermove", (e) => this.onPointerMove(e));
    this.listen(this.canvas, "pointerup", (e) => this.onPointerUp(e));
    this.listen(this.canvas, "pointercancel", (e) => this.onPointerUp(e));
    this.listen(this.canvas, "keydown", (e) => this.onKeyDown(e));
    this.listen(this.canvas, "wheel", (e) => {
      e.preventDefault();
      app.canvas?.processMouseWheel?.(e);
    }, { passive: false });

    // controls
    this.listen(this.snapBox, "change", () => { this.snap = this.snapBox.checked; this.redraw(); });
    this.listen(this.mapsBox, "change", () => {
      this.showMaps = this.mapsBox.checked;
      this.updateControls();
      this.redraw();
    });
    // the frontend's websocket events: a finished Attention Maps node brings this node's maps
    if (api?.addEventListener) this.listen(api, "executed", (e) => this.onExecuted(e?.detail));
    this.listen(this.delButton, "click", () => this.deleteSelected());
    this.listen(this.clearButton, "click", () => {
      if (!this.boxes.length) return;
      this.boxes = [];
      this.selected = -1;
      this.commit(true);
    });
    this.listen(this.subjectInput, "focus", () => this.refreshWords());
    this.listen(this.subjectInput, "input", () => {
      const b = this.boxes[this.selected];
      if (!b) return;
      b.subject = this.subjectInput.value;
      this.commit(false);
    });
    this.listen(this.subjectInput, "change", () => checkState());
    this.listen(this.weightInput, "change", () => {
      const b = this.boxes[this.selected];
      if (!b) return;
      const v = parseFloat(this.weightInput.value);
      if (this.weightInput.value.trim() === "" || !Number.isFinite(v)) delete b.weight;
      else b.weight = v;
      this.commit(true);
    });
    for (const [k, input] of Object.entries(this.numInputs)) {
      this.listen(input, "change", () => this.setCoordinate(k, parseFloat(input.value)));
    }
    for (const input of [this.subjectInput, this.weightInput, ...Object.values(this.numInputs)]) {
      this.listen(input, "keydown", (e) => {
        if (e.key === "Enter") input.blur();
        // typing here must not reach the graph's shortcuts; Ctrl/Cmd combinations (queue, save) still do
        if (!e.ctrlKey && !e.metaKey) e.stopPropagation();
      });
    }

    // the frame follows the space the node gives the widget
    this.resizeObserver = new ResizeObserver(() => this.layoutCanvas());
    this.resizeObserver.observe(this.stage);
    this.cleanups.push(() => this.resizeObserver.disconnect());

    // text -> canvas: typing in the JSON box, or any programmatic value change
    const textEl = this.layoutWidget.element ?? this.layoutWidget.inputEl;
    if (textEl) this.listen(textEl, "input", () => this.syncFromText());
    const widget = this.layoutWidget;
    const previous = widget.callback;
    const editor = this;
    widget.callback = function (...args) {
      const r = previous?.apply(this, args);
      editor.syncFromText();
      return r;
    };
    this.cleanups.push(() => { if (widget.callback) widget.callback = previous; });
  }

  // ---- state <-> text ------------------------------------------------------------------------------
  get text() {
    const v = this.layoutWidget.value;
    return typeof v === "string" ? v : "";
  }

  syncFromText(force = false) {
    const text = this.text;
    if (!force && text === this.lastText) return;
    this.lastText = text;
    const parsed = parseLayoutText(text);
    if (parsed.error) {
      this.error = parsed.error;
    } else {
      this.error = null;
      this.boxes = parsed.boxes;
      this.canvasSize = parsed.canvas;
      this.extra = parsed.extra;
      if (this.selected >= this.boxes.length) this.selected = this.boxes.length - 1;
    }
    this.updateAspect();
    this.updateControls();
    this.redraw();
  }

  /** Write the boxes into the layout widget; `final` also records an undo step. */
  commit(final) {
    const size = latentSize(this.node);
    if (size) this.canvasSize = { width: size.width, height: size.height };
    const text = formatLayout(this.boxes, this.canvasSize, this.extra);
    this.error = null;
    this.lastText = text;
    if (this.layoutWidget.value !== text) this.layoutWidget.value = text;
    this.updateControls();
    this.redraw();
    this.node.setDirtyCanvas?.(true, true);
    if (final) checkState();
  }

  // ---- geometry ------------------------------------------------------------------------------------
  updateAspect() {
    const size = latentSize(this.node);
    let aspect = 1, source = "square";
    if (size) {
      aspect = size.width / size.height;
      source = `${size.width}×${size.height}`;
    } else if (this.canvasSize) {
      aspect = this.canvasSize.width / this.canvasSize.height;
      source = `${this.canvasSize.width}×${this.canvasSize.height} (saved)`;
    }
    if (source !== this.sizeSource || aspect !== this.aspect) {
      this.aspect = aspect;
      this.sizeSource = source;
      this.info.textContent = source;
      this.layoutCanvas();
    }
  }

  layoutCanvas() {
    const sw = this.stage.clientWidth, sh = this.stage.clientHeight;
    if (sw < 4 || sh < 4) return;
    let w = sw, h = sw / this.aspect;
    if (h > sh) { h = sh; w = sh * this.aspect; }
    w = Math.max(8, Math.floor(w));
    h = Math.max(8, Math.floor(h));
    const c = this.canvas;
    c.style.width = `${w}px`;
    c.style.height = `${h}px`;
    c.style.left = `${Math.floor((sw - w) / 2)}px`;
    c.style.top = `${Math.floor((sh - h) / 2)}px`;
    this.cssW = w;
    this.cssH = h;
    this.redraw();
  }

  pixelRatio() {
    const zoom = app.canvas?.ds?.scale ?? 1;
    return Math.min(4, (window.devicePixelRatio || 1) * Math.max(1, zoom));
  }

  /** Pointer position as image fractions, plus the size of one screen pixel in fractions. */
  pointerPos(e) {
    const r = this.canvas.getBoundingClientRect();
    return { x: (e.clientX - r.left) / r.width, y: (e.clientY - r.top) / r.height, px: 1 / r.width, py: 1 / r.height };
  }

  snapValue(v) {
    return this.snap ? Math.round(v * GRID_STEPS) / GRID_STEPS : v;
  }

  /** What is under the pointer: {index, mode: "move"|"resize", edges} or null. */
  hitTest(p) {
    const tx = HANDLE_PX * p.px, ty = HANDLE_PX * p.py;
    const order = [...this.boxes.keys()].reverse();
    if (this.selected >= 0) order.unshift(this.selected);
    for (const i of order) {
      const b = this.boxes[i];
      const inX = p.x >= b.x - tx && p.x <= b.x + b.w + tx, inY = p.y >= b.y - ty && p.y <= b.y + b.h + ty;
      if (!inX || !inY) continue;
      const edges = {
        l: Math.abs(p.x - b.x) <= tx, r: Math.abs(p.x - (b.x + b.w)) <= tx,
        t: Math.abs(p.y - b.y) <= ty, b: Math.abs(p.y - (b.y + b.h)) <= ty,
      };
      if (edges.l && edges.r) edges[p.x < b.x + b.w / 2 ? "r" : "l"] = false;
      if (edges.t && edges.b) edges[p.y < b.y + b.h / 2 ? "b" : "t"] = false;
      if (edges.l || edges.r || edges.t || edges.b) return { index: i, mode: "resize", edges };
    }
    for (const i of order) {
      const b = this.boxes[i];
      if (p.x >= b.x && p.x <= b.x + b.w && p.y >= b.y && p.y <= b.y + b.h) return { index: i, mode: "move" };
    }
    return null;
  }

  cursorFor(hit) {
    if (!hit) return "crosshair";
    if (hit.mode === "move") return "move";
    const { l, r, t, b } = hit.edges;
    if ((l && t) || (r && b)) return "nwse-resize";
    if ((r && t) || (l && b)) return "nesw-resize";
    return l || r ? "ew-resize" : "ns-resize";
  }

  // ---- interaction ---------------------------------------------------------------------------------
  onPointerDown(e) {
    if (e.button === 1) { app.canvas?.processMouseDown?.(e); return; }
    if (e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.canvas.focus({ preventScroll: true });
    this.canvas.setPointerCapture?.(e.pointerId);
    const p = this.pointerPos(e);
    const hit = this.hitTest(p);
    if (hit) {
      this.selected = hit.index;
      this.drag = { mode: hit.mode, edges: hit.edges, start: p, orig: { ...this.boxes[hit.index] }, moved: false };
    } else {
      this.drag = { mode: "new", start: p, moved: false };
    }
    this.updateControls();
    this.redraw();
  }

  onPointerMove(e) {
    const p = this.pointerPos(e);
    const d = this.drag;
    if (!d) {
      this.canvas.style.cursor = this.cursorFor(this.hitTest(p));
      return;
    }
    if ((e.buttons & 4) === 4) { app.canvas?.processMouseMove?.(e); return; }
    const dx = p.x - d.start.x, dy = p.y - d.start.y;
    if (!d.moved && Math.hypot(dx / p.px, dy / p.py) < DRAG_START_PX) return;
    const minW = MIN_BOX_PX * p.px, minH = MIN_BOX_PX * p.py;
    if (d.mode === "new" && !d.moved) {
      this.boxes.push({ subject: this.nextSubject(), x: d.start.x, y: d.start.y, w: 0, h: 0, extra: {} });
      this.selected = this.boxes.length - 1;
    }
    d.moved = true;
    const b = this.boxes[this.selected];
    if (!b) return;
    if (d.mode === "new") {
      const x0 = clamp(this.snapValue(d.start.x), 0, 1), y0 = clamp(this.snapValue(d.start.y), 0, 1);
      const x1 = clamp(this.snapValue(p.x), 0, 1), y1 = clamp(this.snapValue(p.y), 0, 1);
      b.x = Math.min(x0, x1); b.y = Math.min(y0, y1);
      b.w = Math.abs(x1 - x0); b.h = Math.abs(y1 - y0);
    } else if (d.mode === "move") {
      const o = d.orig;
      b.x = clamp(this.snapValue(o.x + dx), 0, 1 - o.w);
      b.y = clamp(this.snapValue(o.y + dy), 0, 1 - o.h);
    } else {
      const o = d.orig;
      let l = o.x, r = o.x + o.w, t = o.y, bt = o.y + o.h;
      if (d.edges.l) l = clamp(this.snapValue(o.x + dx), 0, r - minW);
      if (d.edges.r) r = clamp(this.snapValue(o.x + o.w + dx), l + minW, 1);
      if (d.edges.t) t = clamp(this.snapValue(o.y + dy), 0, bt - minH);
      if (d.edges.b) bt = clamp(this.snapValue(o.y + o.h + dy), t + minH, 1);
      b.x = l; b.y = t; b.w = r - l; b.h = bt - t;
    }
    this.commit(false);
  }

  onPointerUp(e) {
    const d = this.drag;
    if (!d) return;
    this.drag = null;
    this.canvas.releasePointerCapture?.(e.pointerId);
    if (d.moved && d.mode === "new") {
      const b = this.boxes[this.selected];
      const p = this.pointerPos(e);
      if (b && (b.w < MIN_BOX_PX * p.px || b.h < MIN_BOX_PX * p.py)) {   // too small: a slip, not a box
        this.boxes.splice(this.selected, 1);
        this.selected = -1;
      }
    } else if (!d.moved && d.mode === "new") {
      this.selected = -1;
    }
    if (d.moved) this.commit(true);
    this.updateControls();
    this.redraw();
    if (d.moved && d.mode === "new" && this.selected >= 0) {
      this.subjectInput.focus();
      this.subjectInput.select();
    }
  }

  onKeyDown(e) {
    const b = this.boxes[this.selected];
    let handled = true;
    if (e.key === "Delete" || e.key === "Backspace") {
      this.deleteSelected();   // never the node's Delete while the drawing has the focus
    } else if (e.key === "Escape") {
      this.selected = -1;
      this.updateControls();
      this.redraw();
    } else if (b && e.key.startsWith("Arrow")) {
      const r = this.canvas.getBoundingClientRect();
      const sx = this.snap ? 1 / GRID_STEPS : 1 / r.width, sy = this.snap ? 1 / GRID_STEPS : 1 / r.height;
      const step = e.shiftKey && !this.snap ? 10 : 1;
      if (e.key === "ArrowLeft") b.x = clamp(b.x - sx * step, 0, 1 - b.w);
      if (e.key === "ArrowRight") b.x = clamp(b.x + sx * step, 0, 1 - b.w);
      if (e.key === "ArrowUp") b.y = clamp(b.y - sy * step, 0, 1 - b.h);
      if (e.key === "ArrowDown") b.y = clamp(b.y + sy * step, 0, 1 - b.h);
      this.commit(true);
    } else {
      handled = false;
    }
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  deleteSelected() {
    if (!this.boxes[this.selected]) return;
    this.boxes.splice(this.selected, 1);
    this.selected = Math.min(this.selected, this.boxes.length - 1);
    this.commit(true);
  }

  setCoordinate(k, v) {
    const b = this.boxes[this.selected];
    if (!b || !Number.isFinite(v)) { this.updateControls(); return; }
    if (k === "x") b.x = clamp(v, 0, 1 - b.w);
    if (k === "y") b.y = clamp(v, 0, 1 - b.h);
    if (k === "w") b.w = clamp(v, 1 / DECIMALS, 1 - b.x);
    if (k === "h") b.h = clamp(v, 1 / DECIMALS, 1 - b.y);
    this.commit(true);
  }

  nextSubject() {
    const used = new Set(this.boxes.map((b) => b.subject.trim().toLowerCase()));
    const word = promptWords(this.node).find((w) => !used.has(w.toLowerCase()));
    if (word) return word;
    let n = this.boxes.length + 1;
    while (used.has(`subject${n}`)) n++;
    return `subject${n}`;
  }

  refreshWords() {
    const words = promptWords(this.node);
    this.datalist.replaceChildren(...words.map((w) => this.el("option", { value: w })));
  }

  updateControls() {
    const b = this.boxes[this.selected];
    const on = !!b;
    for (const input of [this.subjectInput, this.weightInput, ...Object.values(this.numInputs)]) input.disabled = !on;
    this.delButton.disabled = !on;
    this.clearButton.disabled = !this.boxes.length;
    const active = document.activeElement;
    const set = (input, value) => { if (input !== active) input.value = value; };
    set(this.subjectInput, on ? b.subject : "");
    set(this.weightInput, on && isNum(b.weight) ? String(b.weight) : "");
    for (const k of ["x", "y", "w", "h"]) set(this.numInputs[k], on ? String(round(b[k])) : "");
    if (this.error) {
      this.status.textContent = `${this.error} (the canvas shows the last valid layout)`;
      this.status.classList.add("c2-error");
    } else {
      this.status.classList.remove("c2-error");
      this.status.textContent = this.showMaps && !this.maps
        ? "maps: none yet; run the workflow with a Cones2 Attention Maps node fed by this node's MODEL output"
        : this.showMaps
          ? `attention maps of the last run (${this.maps.subjects[0]?.h ?? 0}×${this.maps.subjects[0]?.w ?? 0} grid) `
            + "under the boxes · % = attention inside the subject's region"
          : this.boxes.length
            ? "drag a box to move it · edges/corners resize · Delete removes · drag empty space for another"
            : "drag on the frame to draw a box for each subject";
    }
  }

  // ---- attention maps ------------------------------------------------------------------------------
  /** The Attention Maps node of an "executed" event, if its `model` input is linked straight to this node. */
  mapsSource(detail) {
    for (const id of [detail.display_node, detail.node]) {
      if (id === undefined || id === null) continue;
      for (const g of [this.node.graph, app.graph]) {
        const n = g?.getNodeById?.(id) ?? g?.getNodeById?.(Number(id));
        if (!n || (n.comfyClass ?? n.type) !== MAPS_NODE_TYPE) continue;
        const slot = inputSlot(n, "model");
        if (slot >= 0 && n.getInputNode(slot) === this.node) return n;
      }
    }
    return null;
  }

  onExecuted(detail) {
    this.mapEvents++;
    try {
      const raw = detail?.output?.[MAPS_UI_KEY];
      if (!Array.isArray(raw)) return;
      const source = this.mapsSource(detail);
      if (!source) return;
      const subjects = [];
      for (const m of raw) {
        if (!m || typeof m.subject !== "string" || !Number.isInteger(m.h) || !Number.isInteger(m.w)) continue;
        if (m.h < 1 || m.w < 1 || !Array.isArray(m.values) || m.values.length !== m.h * m.w) continue;
        const key = m.subject.trim().toLowerCase();
        if (subjects.some((s) => s.key === key)) continue;   // one map per subject (the first)
        subjects.push({ subject: m.subject, key, h: m.h, w: m.w, share: isNum(m.share) ? m.share : null,
          values: Float32Array.from(m.values, (v) => (isNum(v) ? clamp(v, 0, 1) : 0)) });
      }
      this.maps = { node: source.id, prompt: detail.prompt_id ?? null, subjects };
      this.mapImages.clear();
      this.updateControls();
      this.redraw();
      this.node.setDirtyCanvas?.(true, false);
    } catch (err) {
      console.warn("cones2 layout: could not read the attention maps", err);
    }
  }

  mapsShown() {
    return this.showMaps && !!this.maps && !this.error;
  }

  mapFor(key) {
    return this.maps?.subjects.find((s) => s.key === key) ?? null;
  }

  /** The map as a tiny w×h canvas: the colour, with each pixel's alpha = the map's value. */
  mapImage(m, colour) {
    const cacheKey = `${m.key}|${colour}`;
    let img = this.mapImages.get(cacheKey);
    if (img) return img;
    img = document.createElement("canvas");
    img.width = m.w;
    img.height = m.h;
    const n = parseInt(colour.slice(1), 16);
    const r = (n >> 16) & 255, g = (n >> 8) & 255, b = n & 255;
    const ctx = img.getContext("2d");
    const data = ctx.createImageData(m.w, m.h);
    for (let i = 0; i < m.values.length; i++) {
      data.data[4 * i] = r;
      data.data[4 * i + 1] = g;
      data.data[4 * i + 2] = b;
      data.data[4 * i + 3] = Math.round(255 * m.values[i]);
    }
    ctx.putImageData(data, 0, 0);
    this.mapImages.set(cacheKey, img);
    return img;
  }

  /** Every subject's heatmap over the whole frame (bilinear), in its box colour; subjects without a box get
   * the next colours of the palette. */
  drawMaps(ctx, W, H, colours) {
    let extra = colours.size;
    ctx.save();
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = MAPS_ALPHA;
    for (const m of this.maps.subjects) {
      const colour = colours.get(m.key) ?? PALETTE[extra++ % PALETTE.length];
      ctx.drawImage(this.mapImage(m, colour), 0, 0, W, H);
    }
    ctx.restore();
  }

  // ---- drawing -------------------------------------------------------------------------------------
  subjectColours() {
    const map = new Map();
    for (const b of this.boxes) {
      const k = b.subject.trim().toLowerCase();
      if (!map.has(k)) map.set(k, PALETTE[map.size % PALETTE.length]);
    }
    return map;
  }

  redraw() {
    const w = this.cssW, h = this.cssH;
    if (!w || !h) return;
    const pr = this.pixelRatio();
    const bw = Math.round(w * pr), bh = Math.round(h * pr);
    const c = this.canvas, ctx = this.ctx;
    if (c.width !== bw || c.height !== bh) { c.width = bw; c.height = bh; }
    this.drawnRatio = pr;
    const W = bw, H = bh;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#1b1b1f";
    ctx.fillRect(0, 0, W, H);
    // grid: quarters always, the snapping grid when snapping
    const steps = this.snap ? GRID_STEPS : 4;
    ctx.strokeStyle = this.snap ? "rgba(255,255,255,0.12)" : "rgba(255,255,255,0.07)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 1; i < steps; i++) {
      const x = Math.round((i * W) / steps) + 0.5, y = Math.round((i * H) / steps) + 0.5;
      ctx.moveTo(x, 0); ctx.lineTo(x, H);
      ctx.moveTo(0, y); ctx.lineTo(W, y);
    }
    ctx.stroke();
    ctx.strokeStyle = "rgba(255,255,255,0.35)";
    ctx.strokeRect(0.5, 0.5, W - 1, H - 1);

    const colours = this.subjectColours();
    const mapsOn = this.mapsShown();
    if (mapsOn) this.drawMaps(ctx, W, H, colours);
    const labels = [];
    const font = Math.max(9, Math.round(11 * pr));
    ctx.font = `${font}px sans-serif`;
    ctx.textBaseline = "top";
    this.boxes.forEach((b, i) => {
      const col = colours.get(b.subject.trim().toLowerCase());
      const x = b.x * W, y = b.y * H, bw2 = b.w * W, bh2 = b.h * H;
      const sel = i === this.selected;
      ctx.globalAlpha = this.error ? 0.15 : sel ? 0.35 : 0.22;
      ctx.fillStyle = col;
      ctx.fillRect(x, y, bw2, bh2);
      ctx.globalAlpha = this.error ? 0.5 : 1;
      ctx.strokeStyle = col;
      ctx.lineWidth = (sel ? 3 : 2) * pr;
      ctx.strokeRect(x + ctx.lineWidth / 2, y + ctx.lineWidth / 2, bw2 - ctx.lineWidth, bh2 - ctx.lineWidth);
      if (sel) {
        ctx.setLineDash([4 * pr, 3 * pr]);
        ctx.strokeStyle = "#ffffff";
        ctx.lineWidth = pr;
        ctx.strokeRect(x + 0.5, y + 0.5, bw2 - 1, bh2 - 1);
        ctx.setLineDash([]);
      }
      // label tag
      const map = mapsOn ? this.mapFor(b.subject.trim().toLowerCase()) : null;
      const label = (b.subject.trim() || "(no subject)") + (isNum(b.weight) ? ` ×${b.weight}` : "")
        + (map && map.share !== null ? ` ${Math.round(map.share * 100)}%` : "");
      labels.push(label);
      const pad = 3 * pr;
      const tw = Math.min(ctx.measureText(label).width + 2 * pad, Math.max(bw2, 20 * pr));
      ctx.fillStyle = col;
      ctx.fillRect(x, y, tw, font + 2 * pad);
      ctx.fillStyle = this.textColour(col);
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, y, tw, font + 2 * pad);
      ctx.clip();
      ctx.fillText(label, x + pad, y + pad);
      ctx.restore();
      if (sel) {
        const hs = 4 * pr;
        ctx.fillStyle = "#ffffff";
        ctx.strokeStyle = "#000000";
        ctx.lineWidth = pr;
        for (const [hx, hy] of [[0, 0], [0.5, 0], [1, 0], [0, 0.5], [1, 0.5], [0, 1], [0.5, 1], [1, 1]]) {
          const cx = x + hx * bw2, cy = y + hy * bh2;
          ctx.fillRect(cx - hs, cy - hs, 2 * hs, 2 * hs);
          ctx.strokeRect(cx - hs, cy - hs, 2 * hs, 2 * hs);
        }
      }
      ctx.globalAlpha = 1;
    });
    if (!this.boxes.length) {
      ctx.fillStyle = "rgba(255,255,255,0.45)";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("drag to draw a box", W / 2, H / 2);
      ctx.textAlign = "left";
    }
    this.redraws++;
    c.dataset.boxes = JSON.stringify(this.boxes.map(({ subject, x, y, w: bw3, h: bh3, weight }) =>
      ({ subject, x: round(x), y: round(y), w: round(bw3), h: round(bh3), weight })));
    c.dataset.selected = String(this.selected);
    c.dataset.redraws = String(this.redraws);
    c.dataset.aspect = String(this.aspect);
    c.dataset.maps = mapsOn ? "on" : "off";
    c.dataset.labels = JSON.stringify(labels);
    this.labels = labels;
  }

  textColour(hex) {
    const n = parseInt(hex.slice(1), 16);
    const lum = 0.299 * ((n >> 16) & 255) + 0.587 * ((n >> 8) & 255) + 0.114 * (n & 255);
    return lum > 150 ? "#000000" : "#ffffff";
  }

  /** Called while the node is drawn: catches value changes made without a callback and graph changes. */
  onFrame() {
    if (this.text !== this.lastText) this.syncFromText();
    this.updateAspect();
    if (this.cssW && this.drawnRatio !== this.pixelRatio()) this.redraw();
  }

  /** A plain snapshot, for tests and debugging. */
  state() {
    const r = this.canvas.getBoundingClientRect();
    return {
      boxes: this.boxes.map(({ subject, x, y, w, h, weight }) => ({ subject, x, y, w, h, weight })),
      selected: this.selected, error: this.error, aspect: this.aspect, snap: this.snap, redraws: this.redraws,
      rect: { left: r.left, top: r.top, width: r.width, height: r.height },
      showMaps: this.showMaps, mapsShown: this.mapsShown(), mapEvents: this.mapEvents, labels: [...this.labels],
      maps: this.maps && { node: this.maps.node, prompt: this.maps.prompt,
        subjects: this.maps.subjects.map(({ subject, h, w, share }) => ({ subject, h, w, share })) },
    };
  }

  destroy() {
    for (const fn of this.cleanups.splice(0)) {
      try { fn(); } catch (err) { /* already gone */ }
    }
    this.maps = null;
    this.mapImages.clear();
    this.root.remove();
  }
}

app.registerExtension({
  name: "cones2.layout",
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE && node.type !== NODE_TYPE) return;
    const layoutWidget = widgetByName(node, LAYOUT_WIDGET);
    if (!layoutWidget || widgetByName(node, EDITOR_WIDGET)) return;
    if (layoutWidget.dynamicPrompts) {
      // {a|b} expansion would eat the JSON's braces
      layoutWidget.dynamicPrompts = false;
      delete layoutWidget.serializeValue;
    }
    // the JSON box scrolls; the drawing gets the room
    if (layoutWidget.options && !layoutWidget.options.getMaxHeight) layoutWidget.options.getMaxHeight = () => 150;
    const editor = new LayoutEditor(node, layoutWidget);
    // Added last: a non-serialised widget before others would shift widgets_values.
    const widget = node.addDOMWidget(EDITOR_WIDGET, "cones2-layout", editor.root, {
      serialize: false,
      hideOnZoom: true,
      getMinHeight: () => 300,
      getValue: () => undefined,
      setValue: () => {},
      onDraw: () => editor.onFrame(),
    });
    widget.serialize = false;
    editor.widget = widget;
    node.cones2Layout = editor;

    const onRemoved = node.onRemoved;
    node.onRemoved = function (...args) {
      editor.destroy();
      if (node.cones2Layout === editor) delete node.cones2Layout;
      return onRemoved?.apply(this, args);
    };
    const size = node.computeSize();
    node.setSize([Math.max(size[0], 420), Math.max(size[1], 720)]);
  },
});
