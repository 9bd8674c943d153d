// LayoutEditor: one node's editor state (boxes, selection, the last run's attention maps), kept in step with
// the node's `layout` text, and the frame's geometry. Only exports (see model.js).
//
// The `layout` STRING widget stays the single source of truth: every canvas edit rewrites that text, and
// every change of the text (typing, loading a workflow, pasting a node, undo) redraws the canvas.
import { attachEvents } from "./events.js";
import { checkState, latentSize, mapsSource, pixelRatio, promptWords } from "./graph.js";
import {
  MAPS_UI_KEY, boxAt, deleteKeyframe, formatLayout, isNum, keyframeIndex, nextSubject, parseLayoutText, readMaps,
  round, setKeyframe, trackPath,
} from "./model.js";
import { vacate, watch } from "./mount.js";
import { buildPanel, el } from "./panel.js";
import { drawLayout } from "./render.js";

const HINT_EMPTY = "drag on the frame to draw a box for each subject";
const HINT_BOXES = "drag a box to move it · edges/corners resize · Delete removes · drag empty space for another";
const HINT_TRACK = "drag or resize a box to set its keyframe at this time · the slider moves through the clip";
const HINT_NO_MAPS = "maps: none yet; run the workflow with a Cones2 Attention Maps node fed by this node's MODEL output";

export class LayoutEditor {
  constructor(node, layoutWidget) {
    this.node = node;
    this.layoutWidget = layoutWidget;
    this.boxes = [];
    this.canvasSize = null;   // stored in the JSON
    this.extra = {};
    this.selected = -1;
    this.snap = false;
    this.tracking = false;    // "track" on: the time slider is shown and edits set keyframes
    this.time = 0;            // the clip time shown (0..1); 0 whenever tracking is off
    this.error = null;        // why the text cannot be drawn (the canvas keeps the last boxes it could draw)
    this.refusal = null;      // why the node would refuse the layout
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
    this.lastDrawn = -Infinity;   // when the canvas last drew the node (classic mode; never under Vue nodes)
    this.remounts = 0;            // places taken over from the node's previous editor (see mount.js)
    Object.assign(this, buildPanel());
    this.ctx = this.canvas.getContext("2d");
    attachEvents(this);
    this.cleanups.push(watch(this));
    this.syncFromText(true);
  }

  listen(target, type, fn, opts) {
    target.addEventListener(type, fn, opts);
    this.cleanups.push(() => target.removeEventListener(type, fn, opts));
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
    this.error = parsed.error ?? null;
    this.refusal = parsed.refusal;
    if (!parsed.error) {
      this.boxes = parsed.boxes;
      this.canvasSize = parsed.canvas;
      this.extra = parsed.extra;
      if (this.selected >= this.boxes.length) this.selected = this.boxes.length - 1;
      // a layout with tracks shows its time slider
      if (this.boxes.some((b) => b.frames)) this.setTracking(true, false);
    }
    this.updateAspect();
    this.refresh();
  }

  /** Write the boxes into the layout widget; `final` also records an undo step. */
  commit(final) {
    const size = latentSize(this.node);
    if (size) this.canvasSize = { width: size.width, height: size.height };
    const text = formatLayout(this.boxes, this.canvasSize, this.extra);
    this.error = null;
    this.refusal = parseLayoutText(text).refusal;
    this.lastText = text;
    if (this.layoutWidget.value !== text) this.layoutWidget.value = text;
    this.refresh();
    this.node.setDirtyCanvas?.(true, true);
    if (final) checkState();
  }

  // ---- tracks --------------------------------------------------------------------------------------
  /** The boxes as drawn: each at the time shown. */
  shownBoxes() {
    return this.boxes.map((b) => boxAt(b, this.time));
  }

  /** An edit of box i to the rectangle r: its keyframe at the time shown when tracking (or when it has a track,
   * at t = 0), else the still box itself. */
  applyRect(i, r) {
    const b = this.boxes[i];
    if (!b) return;
    if (this.tracking || b.frames) setKeyframe(b, this.time, r);
    else Object.assign(b, { x: r.x, y: r.y, w: r.w, h: r.h });
  }

  setTracking(on, refresh = true) {
    this.tracking = on;
    if (!on) this.time = 0;
    this.trackBox.checked = on;
    this.timeRow.hidden = !on;
    if (refresh) this.refresh();
  }

  setTime(t) {
    this.time = Math.min(Math.max(round(t), 0), 1);
    this.refresh();
  }

  deleteKeyframe() {
    const b = this.boxes[this.selected];
    if (b && deleteKeyframe(b, this.time)) this.commit(true);
  }

  deleteSelected() {
    if (!this.boxes[this.selected]) return;
    this.boxes.splice(this.selected, 1);
    this.selected = Math.min(this.selected, this.boxes.length - 1);
    this.commit(true);
  }

  nextSubject() {
    return nextSubject(this.boxes, promptWords(this.node));
  }

  refreshWords() {
    this.datalist.replaceChildren(...promptWords(this.node).map((w) => el("option", { value: w })));
  }

  // ---- geometry ------------------------------------------------------------------------------------
  /** The frame takes the generation's aspect: the latent's size, else the size saved in the layout. */
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

  /** The largest frame of the aspect that fits the stage, centred. */
  layoutCanvas() {
    const sw = this.stage.clientWidth, sh = this.stage.clientHeight;
    if (sw < 4 || sh < 4) return;
    let w = sw, h = sw / this.aspect;
    if (h > sh) { h = sh; w = sh * this.aspect; }
    w = Math.max(8, Math.floor(w));
    h = Math.max(8, Math.floor(h));
    const s = this.canvas.style;
    s.width = `${w}px`;
    s.height = `${h}px`;
    s.left = `${Math.floor((sw - w) / 2)}px`;
    s.top = `${Math.floor((sh - h) / 2)}px`;
    this.cssW = w;
    this.cssH = h;
    this.redraw();
  }

  // ---- controls and drawing ------------------------------------------------------------------------
  refresh() {
    this.updateControls();
    this.redraw();
  }

  statusText() {
    if (this.showMaps && !this.maps) return HINT_NO_MAPS;
    if (this.showMaps) {
      const m = this.maps.subjects[0];
      return `attention maps of the last run (${m?.h ?? 0}×${m?.w ?? 0} grid) under the boxes · % = attention `
        + "inside the subject's region";
    }
    if (this.tracking && this.boxes.length) return HINT_TRACK;
    return this.boxes.length ? HINT_BOXES : HINT_EMPTY;
  }

  updateControls() {
    const own = this.boxes[this.selected];
    const b = own && boxAt(own, this.time);
    const on = !!b;
    for (const input of [this.subjectInput, this.weightInput, ...Object.values(this.numInputs)]) input.disabled = !on;
    this.delButton.disabled = !on;
    this.clearButton.disabled = !this.boxes.length;
    const active = document.activeElement;
    const set = (input, value) => { if (input !== active) input.value = value; };
    set(this.subjectInput, on ? b.subject : "");
    set(this.weightInput, on && isNum(b.weight) ? String(b.weight) : "");
    for (const k of ["x", "y", "w", "h"]) set(this.numInputs[k], on ? String(round(b[k])) : "");
    this.trackBox.checked = this.tracking;
    this.timeRow.hidden = !this.tracking;
    set(this.timeSlider, String(this.time));
    this.timeLabel.textContent = `t ${this.time.toFixed(2)}`;
    const atKey = on && keyframeIndex(own, this.time) >= 0;
    this.delKeyButton.disabled = !atKey;
    const ticks = (own?.frames ?? []).map((f) => String(f.t));
    if (ticks.join() !== [...this.keyList.options].map((o) => o.value).join()) {
      this.keyList.replaceChildren(...ticks.map((t) => el("option", { value: t })));
    }
    // an empty layout is refused too, but the hint to draw says that already
    const refused = !this.error && this.boxes.length && this.refusal;
    this.status.classList.toggle("c2-error", !!this.error);
    this.status.classList.toggle("c2-refused", !!refused);
    this.status.textContent = this.error ? `${this.error} (the canvas shows the last valid layout)`
      : refused ? `the node will refuse this layout: ${this.refusal}` : this.statusText();
  }

  mapsShown() {
    return this.showMaps && !!this.maps && !this.error;
  }

  redraw() {
    if (!this.cssW || !this.cssH) return;
    const pr = pixelRatio();
    const W = Math.round(this.cssW * pr), H = Math.round(this.cssH * pr);
    if (this.canvas.width !== W || this.canvas.height !== H) { this.canvas.width = W; this.canvas.height = H; }
    this.drawnRatio = pr;
    this.labels = drawLayout(this.ctx, W, H, pr, { boxes: this.shownBoxes(), selected: this.selected, snap: this.snap,
      dim: !!this.error, maps: this.mapsShown() ? this.maps.subjects : null, cache: this.mapImages,
      tracks: this.tracking ? this.boxes.map(trackPath) : null, now: this.time });
    this.redraws++;
  }

  /** Called while the node is drawn (the DOM widget's onDraw). */
  onDraw() {
    this.lastDrawn = performance.now();
    this.onFrame();
  }

  /** Each frame the editor is shown: catches value changes made without a callback, and graph changes. */
  onFrame() {
    if (this.text !== this.lastText) this.syncFromText();
    this.updateAspect();
    if (this.cssW && this.drawnRatio !== pixelRatio()) this.redraw();
  }

  // ---- attention maps ------------------------------------------------------------------------------
  onExecuted(detail) {
    this.mapEvents++;
    try {
      const raw = detail?.output?.[MAPS_UI_KEY];
      if (!Array.isArray(raw)) return;
      const source = mapsSource(this.node, detail);
      if (!source) return;
      this.maps = { node: source.id, prompt: detail.prompt_id ?? null, subjects: readMaps(raw) };
      this.mapImages.clear();
      this.refresh();
      this.node.setDirtyCanvas?.(true, false);
    } catch (err) {
      console.warn("cones2 layout: could not read the attention maps", err);
    }
  }

  // ---- lifetime ------------------------------------------------------------------------------------
  /** The one hook for tests and debugging: a plain snapshot of what the editor holds and shows. */
  state() {
    const r = this.canvas.getBoundingClientRect();
    const plain = ({ subject, x, y, w, h, weight }) => ({ subject, x, y, w, h, weight });
    return {
      boxes: this.boxes.map((b) => ({ ...plain(b), ...(b.frames ? { frames: b.frames.map(({ t, x, y, w, h }) =>
        ({ t, x, y, w, h })) } : {}) })),
      tracking: this.tracking, time: this.time, shownBoxes: this.shownBoxes().map(plain),
      selected: this.selected, error: this.error, refusal: this.refusal, aspect: this.aspect, snap: this.snap,
      redraws: this.redraws, shown: this.root.isConnected, remounts: this.remounts, rect: { left: r.left, top: r.top, width: r.width, height: r.height },
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
    vacate(this);
  }
}
