// The editor's input: mouse and keys on the canvas, the controls, the layout text box and the frontend's
// "executed" events. Each listener is registered through `ed.listen`, so `ed.destroy()` removes it.
// Only exports (see model.js).
import { comfyApi } from "./comfy.js";
import { checkState, graphCanvas } from "./graph.js";
import { DECIMALS, GRID_STEPS, boxAt, clamp, cursorFor, hitTest, snapValue } from "./model.js";

const HANDLE_PX = 7;       // grab distance for edges and corners, in screen pixels
const DRAG_START_PX = 3;   // a press that moves less than this is a click
const MIN_BOX_PX = 4;      // smallest box, in screen pixels of the editor

/** Pointer position as image fractions, plus the size of one screen pixel in fractions. */
function pointerPos(ed, e) {
  const r = ed.canvas.getBoundingClientRect();
  return { x: (e.clientX - r.left) / r.width, y: (e.clientY - r.top) / r.height, px: 1 / r.width, py: 1 / r.height };
}

const hitAt = (ed, p) => hitTest(ed.shownBoxes(), ed.selected, p, { x: HANDLE_PX * p.px, y: HANDLE_PX * p.py });

function onPointerDown(ed, e) {
  if (e.button === 1) { graphCanvas()?.processMouseDown?.(e); return; }   // middle button pans the graph
  if (e.button !== 0) return;
  e.preventDefault();
  e.stopPropagation();
  ed.canvas.focus({ preventScroll: true });
  ed.canvas.setPointerCapture?.(e.pointerId);
  const p = pointerPos(ed, e);
  const hit = hitAt(ed, p);
  if (hit) {
    ed.selected = hit.index;
    // the box as shown at the slider's time: the drag sets its keyframe there (see LayoutEditor.applyRect)
    ed.drag = { mode: hit.mode, edges: hit.edges, start: p, orig: boxAt(ed.boxes[hit.index], ed.time), moved: false };
  } else {
    ed.drag = { mode: "new", start: p, moved: false };
  }
  ed.refresh();
}

/** The dragged box's new geometry; `d` is the drag, p the pointer now. */
function dragBox(ed, d, b, p) {
  const snap = (v) => snapValue(v, ed.snap);
  const dx = p.x - d.start.x, dy = p.y - d.start.y;
  const o = d.orig;
  if (d.mode === "new") {
    const x0 = clamp(snap(d.start.x), 0, 1), y0 = clamp(snap(d.start.y), 0, 1);
    const x1 = clamp(snap(p.x), 0, 1), y1 = clamp(snap(p.y), 0, 1);
    b.x = Math.min(x0, x1); b.y = Math.min(y0, y1);
    b.w = Math.abs(x1 - x0); b.h = Math.abs(y1 - y0);
  } else if (d.mode === "move") {
    b.x = clamp(snap(o.x + dx), 0, 1 - o.w);
    b.y = clamp(snap(o.y + dy), 0, 1 - o.h);
  } else {
    const minW = MIN_BOX_PX * p.px, minH = MIN_BOX_PX * p.py;
    let l = o.x, r = o.x + o.w, t = o.y, bt = o.y + o.h;
    if (d.edges.l) l = clamp(snap(o.x + dx), 0, r - minW);
    if (d.edges.r) r = clamp(snap(o.x + o.w + dx), l + minW, 1);
    if (d.edges.t) t = clamp(snap(o.y + dy), 0, bt - minH);
    if (d.edges.b) bt = clamp(snap(o.y + o.h + dy), t + minH, 1);
    b.x = l; b.y = t; b.w = r - l; b.h = bt - t;
  }
}

function onPointerMove(ed, e) {
  const p = pointerPos(ed, e);
  const d = ed.drag;
  if (!d) {
    ed.canvas.style.cursor = cursorFor(hitAt(ed, p));
    return;
  }
  if ((e.buttons & 4) === 4) { graphCanvas()?.processMouseMove?.(e); return; }
  if (!d.moved && Math.hypot((p.x - d.start.x) / p.px, (p.y - d.start.y) / p.py) < DRAG_START_PX) return;
  if (d.mode === "new" && !d.moved) {
    ed.boxes.push({ subject: ed.nextSubject(), x: d.start.x, y: d.start.y, w: 0, h: 0, extra: {} });
    ed.selected = ed.boxes.length - 1;
  }
  d.moved = true;
  const b = ed.boxes[ed.selected];
  if (!b) return;
  if (d.mode === "new") {
    dragBox(ed, d, b, p);   // a new box holds still until it is moved at another time
  } else {
    const r = { ...d.orig };
    dragBox(ed, d, r, p);
    ed.applyRect(ed.selected, r);
  }
  ed.commit(false);
}

function onPointerUp(ed, e) {
  const d = ed.drag;
  if (!d) return;
  ed.drag = null;
  ed.canvas.releasePointerCapture?.(e.pointerId);
  if (d.moved && d.mode === "new") {
    const b = ed.boxes[ed.selected];
    const p = pointerPos(ed, e);
    if (b && (b.w < MIN_BOX_PX * p.px || b.h < MIN_BOX_PX * p.py)) {   // too small: a slip, not a box
      ed.boxes.splice(ed.selected, 1);
      ed.selected = -1;
    }
  } else if (!d.moved && d.mode === "new") {
    ed.selected = -1;   // a click on empty space deselects
  }
  if (d.moved) ed.commit(true);
  ed.refresh();
  if (d.moved && d.mode === "new" && ed.selected >= 0) {
    ed.subjectInput.focus();
    ed.subjectInput.select();
  }
}

function onKeyDown(ed, e) {
  const own = ed.boxes[ed.selected];
  const b = own && boxAt(own, ed.time);
  let handled = true;
  if (e.key === "Delete" || e.key === "Backspace") {
    ed.deleteSelected();   // never the node's Delete while the drawing has the focus
  } else if (e.key === "Escape") {
    ed.selected = -1;
    ed.refresh();
  } else if (b && e.key.startsWith("Arrow")) {
    const r = ed.canvas.getBoundingClientRect();
    const sx = ed.snap ? 1 / GRID_STEPS : 1 / r.width, sy = ed.snap ? 1 / GRID_STEPS : 1 / r.height;
    const step = e.shiftKey && !ed.snap ? 10 : 1;
    if (e.key === "ArrowLeft") b.x = clamp(b.x - sx * step, 0, 1 - b.w);
    if (e.key === "ArrowRight") b.x = clamp(b.x + sx * step, 0, 1 - b.w);
    if (e.key === "ArrowUp") b.y = clamp(b.y - sy * step, 0, 1 - b.h);
    if (e.key === "ArrowDown") b.y = clamp(b.y + sy * step, 0, 1 - b.h);
    ed.applyRect(ed.selected, b);
    ed.commit(true);
  } else {
    handled = false;
  }
  if (handled) {
    e.preventDefault();
    e.stopPropagation();
  }
}

function setCoordinate(ed, k, v) {
  const own = ed.boxes[ed.selected];
  if (!own || !Number.isFinite(v)) { ed.updateControls(); return; }
  const b = boxAt(own, ed.time);
  if (k === "x") b.x = clamp(v, 0, 1 - b.w);
  if (k === "y") b.y = clamp(v, 0, 1 - b.h);
  if (k === "w") b.w = clamp(v, 1 / DECIMALS, 1 - b.x);
  if (k === "h") b.h = clamp(v, 1 / DECIMALS, 1 - b.y);
  ed.applyRect(ed.selected, b);
  ed.commit(true);
}

function attachCanvas(ed) {
  const c = ed.canvas;
  ed.listen(c, "pointerdown", (e) => onPointerDown(ed, e));
  ed.listen(c, "pointermove", (e) => onPointerMove(ed, e));
  ed.listen(c, "pointerup", (e) => onPointerUp(ed, e));
  ed.listen(c, "pointercancel", (e) => onPointerUp(ed, e));
  ed.listen(c, "keydown", (e) => onKeyDown(ed, e));
  // the wheel zooms the graph, as it does everywhere else on the node
  ed.listen(c, "wheel", (e) => {
    e.preventDefault();
    graphCanvas()?.processMouseWheel?.(e);
  }, { passive: false });
}

function attachControls(ed) {
  ed.listen(ed.snapBox, "change", () => { ed.snap = ed.snapBox.checked; ed.redraw(); });
  ed.listen(ed.mapsBox, "change", () => { ed.showMaps = ed.mapsBox.checked; ed.refresh(); });
  ed.listen(ed.trackBox, "change", () => ed.setTracking(ed.trackBox.checked));
  ed.listen(ed.timeSlider, "input", () => ed.setTime(parseFloat(ed.timeSlider.value)));
  ed.listen(ed.delKeyButton, "click", () => ed.deleteKeyframe());
  ed.listen(ed.delButton, "click", () => ed.deleteSelected());
  ed.listen(ed.clearButton, "click", () => {
    if (!ed.boxes.length) return;
    ed.boxes = [];
    ed.selected = -1;
    ed.commit(true);
  });
  ed.listen(ed.subjectInput, "focus", () => ed.refreshWords());
  ed.listen(ed.subjectInput, "input", () => {
    const b = ed.boxes[ed.selected];
    if (!b) return;
    b.subject = ed.subjectInput.value;
    ed.commit(false);
  });
  ed.listen(ed.subjectInput, "change", () => checkState());
  ed.listen(ed.weightInput, "change", () => {
    const b = ed.boxes[ed.selected];
    if (!b) return;
    const v = parseFloat(ed.weightInput.value);
    if (ed.weightInput.value.trim() === "" || !Number.isFinite(v)) delete b.weight;
    else b.weight = v;
    ed.commit(true);
  });
  for (const [k, input] of Object.entries(ed.numInputs)) {
    ed.listen(input, "change", () => setCoordinate(ed, k, parseFloat(input.value)));
  }
  for (const input of [ed.subjectInput, ed.weightInput, ...Object.values(ed.numInputs)]) {
    ed.listen(input, "keydown", (e) => {
      if (e.key === "Enter") input.blur();
      // typing here must not reach the graph's shortcuts; Ctrl/Cmd combinations (queue, save) still do
      if (!e.ctrlKey && !e.metaKey) e.stopPropagation();
    });
  }
}

/** text -> canvas: typing in the JSON box, or any programmatic change that calls the widget's callback. */
function attachText(ed) {
  const textEl = ed.layoutWidget.element ?? ed.layoutWidget.inputEl;
  if (textEl) ed.listen(textEl, "input", () => ed.syncFromText());
  const widget = ed.layoutWidget;
  const previous = widget.callback;
  widget.callback = function (...args) {
    const r = previous?.apply(this, args);
    ed.syncFromText();
    return r;
  };
  ed.cleanups.push(() => { if (widget.callback) widget.callback = previous; });
}

/** Wires every input of the editor `ed` (a LayoutEditor whose panel is built). */
export function attachEvents(ed) {
  attachCanvas(ed);
  attachControls(ed);
  attachText(ed);
  // a finished Attention Maps node brings this node's maps, in the frontend's websocket events
  const api = comfyApi();
  if (api?.addEventListener) ed.listen(api, "executed", (e) => ed.onExecuted(e?.detail));
  // the frame follows the space the node gives the widget
  const observer = new ResizeObserver(() => ed.layoutCanvas());
  observer.observe(ed.stage);
  ed.cleanups.push(() => observer.disconnect());
}
