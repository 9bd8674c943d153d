// The layout editor's model: the layout JSON read and written, and pure geometry on its boxes.
// No DOM and no ComfyUI here, so plain node can import it (tests/js/). Only exports: the frontend imports
// every .js file under web/ as an extension, so importing this module must do nothing.
//
// The node's parser, cones2_core/layout.py `parse_layout`, decides what a valid layout is; `parseLayoutText`
// below reads the same text for drawing and says, in `refusal`, why that parser would refuse it.
// tests/fixtures/layouts.json holds the cases both sides are checked against.

export const NODE_TYPE = "Cones2LayoutGuidance";
export const MAPS_NODE_TYPE = "Cones2AttentionMaps";
export const MAPS_UI_KEY = "cones2_maps";   // owner: MAPS_UI_KEY in nodes/maps_node.py
export const LAYOUT_WIDGET = "layout";
export const EDITOR_WIDGET = "cones2_layout_editor";
export const LAYOUT_VERSION = 1;            // owner: LAYOUT_VERSION in cones2_core/layout.py
const MAX_LAYOUT_CHARS = 1_000_000;         // owner: MAX_LAYOUT_CHARS in cones2_core/layout.py
const MAX_BOX_WEIGHT = 50;                  // owner: MAX_BOX_WEIGHT in cones2_core/layout.py
const MAX_KEYFRAMES = 1000;                 // owner: MAX_KEYFRAMES in cones2_core/layout.py
const SLACK = 1e-6;                         // owner: _SLACK in cones2_core/layout.py
export const GRID_STEPS = 16;               // snapping grid: 1/16 of the image on each axis
export const DECIMALS = 1e4;                // coordinates are stored with 4 decimals
const COORDS = ["x", "y", "w", "h"];
const BOX_KEYS = ["subject", ...COORDS, "weight", "frames"];
const KEY_KEYS = ["t", ...COORDS];
const KEY_EXAMPLE = '{"t": 0.5, "x": 0.1, "y": 0.1, "w": 0.4, "h": 0.8}';
const STOPWORDS = new Set((
  "a an the and or of on in at to with by for from into onto under over near next beside behind " +
  "front back top left right is are be this that his her its their photo picture image style very " +
  "high quality detailed best masterpiece"
).split(" "));

export const round = (v) => Math.round(v * DECIMALS) / DECIMALS;
export const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
export const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const isObject = (v) => !!v && typeof v === "object" && !Array.isArray(v);
// how the Python messages print a value, near enough to read the same
const show = (v) => (typeof v === "string" ? `'${v}'` : JSON.stringify(v));

/** x, y, w, h of a box or keyframe object `raw` called `name`, checked as parse_layout's `_rect` checks them:
 * {c} to draw (inside the frame), `problem` = the first refusal, `fatal` = it cannot be drawn. */
function readRect(raw, name) {
  const c = {};
  let problem = null;
  for (const k of COORDS) {
    const v = raw[k];
    let bad = null;
    if (!(k in raw)) bad = `${name} is missing '${k}': every box needs x, y, w and h`;
    else if (typeof v !== "number") bad = `${name}: '${k}' must be a number, got ${show(v)}`;
    else if (!Number.isFinite(v)) bad = `${name}: '${k}' must be a finite number, got ${v}`;
    if (bad) return { problem: problem ?? bad, fatal: true };
    if (!(v >= -SLACK && v <= 1 + SLACK)) problem ??= `${name}: '${k}' = ${v} is outside 0..1`;
    c[k] = clamp(v, 0, 1);
  }
  if (c.w <= 0 || c.h <= 0) problem ??= `${name} has zero area (w=${c.w}, h=${c.h})`;
  if (c.x + c.w > 1 + SLACK) problem ??= `${name} extends past the right edge (x + w = ${+(c.x + c.w).toPrecision(6)} > 1)`;
  if (c.y + c.h > 1 + SLACK) problem ??= `${name} extends past the bottom edge (y + h = ${+(c.y + c.h).toPrecision(6)} > 1)`;
  // past the edge: drawn up to the edge (the refusal says why); within the slack it stays as parsed
  if (c.x + c.w > 1 + SLACK) c.w = 1 - c.x;
  if (c.y + c.h > 1 + SLACK) c.h = 1 - c.y;
  return { c, problem };
}

/** A box's `frames` (its track) as parse_layout's `_parse_frames` reads them: {frames} sorted by t (of two
 * keyframes at one t the first is drawn), `problem` = the first refusal, `fatal` = the box cannot be drawn. */
function readFrames(raw, name) {
  if (raw === undefined || raw === null) return { frames: [], problem: null };
  if (!Array.isArray(raw)) {
    const type = isObject(raw) ? "dict" : typeof raw === "string" ? "str" : typeof raw;
    return { problem: `${name}: 'frames' must be a list of keyframes like ${KEY_EXAMPLE}, got a ${type}`, fatal: true };
  }
  let problem = raw.length > MAX_KEYFRAMES
    ? `${name} has ${raw.length} keyframes; a track holds at most ${MAX_KEYFRAMES}` : null;
  const frames = [];
  for (const [j, item] of raw.entries()) {
    const where = `${name}, keyframe ${j}`;
    if (!isObject(item)) return { problem: problem ?? `${where} is not an object like ${KEY_EXAMPLE}`, fatal: true };
    const t = item.t;
    let bad = null;
    if (!("t" in item)) bad = `${where} is missing 't' (its time in the clip, 0 = first frame, 1 = last)`;
    else if (typeof t !== "number") bad = `${where}: 't' must be a number, got ${show(t)}`;
    else if (!Number.isFinite(t)) bad = `${where}: 't' must be a finite number, got ${t}`;
    if (bad) return { problem: problem ?? bad, fatal: true };
    if (!(t >= 0 && t <= 1)) problem ??= `${where}: 't' = ${t} is outside 0..1 (0 = the first frame, 1 = the last)`;
    const r = readRect(item, where);
    if (r.fatal) return { problem: problem ?? r.problem, fatal: true };
    problem ??= r.problem;
    const extra = {};
    for (const [k, v] of Object.entries(item)) if (!KEY_KEYS.includes(k)) extra[k] = v;
    frames.push({ t: clamp(t, 0, 1), ...r.c, extra });
  }
  frames.sort((a, b) => a.t - b.t);   // stable, like Python's sort
  const kept = [];
  for (const f of frames) {
    if (kept.length && kept[kept.length - 1].t === f.t) problem ??= `${name} has two keyframes at t = ${f.t}: keep one`;
    else kept.push(f);
  }
  return { frames: kept, problem };
}

/** One box of the text: {box} to draw, `problem` = why parse_layout refuses it, `fatal` = it cannot be drawn.
 * The checks run in parse_layout's order, so the first problem is the one the node reports. */
function readBox(i, raw) {
  if (!isObject(raw)) return { problem: `box ${i} is not an object`, fatal: true };
  const subject = typeof raw.subject === "string" ? raw.subject.trim() : "";
  let problem = subject ? null : `box ${i} has no subject: type the subject word for it (e.g. "dog")`;
  const name = `box ${i} ('${subject}')`;
  const r = readRect(raw, name);
  if (r.fatal) return { problem: problem ?? r.problem, fatal: true };
  problem ??= r.problem;
  const box = { subject, ...r.c, extra: {} };
  const weight = raw.weight;
  if (isNum(weight)) {
    box.weight = weight;
    if (!(weight >= 0 && weight <= MAX_BOX_WEIGHT)) problem ??= `${name}: 'weight' = ${weight} is outside 0..${MAX_BOX_WEIGHT}`;
  } else if (weight !== undefined && weight !== null) {
    problem ??= `${name}: 'weight' must be a ${typeof weight === "number" ? "finite " : ""}number, got ${show(weight)}`;
  }
  const f = readFrames(raw.frames, name);
  if (f.fatal) return { problem: problem ?? f.problem, fatal: true };
  problem ??= f.problem;
  if (f.frames.length) box.frames = f.frames;
  for (const [k, v] of Object.entries(raw)) if (!BOX_KEYS.includes(k)) box.extra[k] = v;
  return { box, problem };
}

/** Layout text -> {boxes, canvas, extra, refusal} to draw, or {error, refusal} when it cannot be drawn.
 * `refusal` (null when the node accepts the layout) is the first reason parse_layout would refuse it.
 * Empty text draws no boxes. Unknown keys are kept in `extra` so that writing the layout back keeps them. */
export function parseLayoutText(text) {
  if (typeof text !== "string" || !text.trim()) {
    return { boxes: [], canvas: null, extra: {}, refusal: "the layout is empty: draw at least one box" };
  }
  let refusal = text.length > MAX_LAYOUT_CHARS ? `the layout is ${text.length} characters long` : null;
  const fail = (error) => ({ error, refusal: refusal ?? error });
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    return fail(`the layout is not valid JSON: ${err.message}`);
  }
  if (!isObject(data)) return fail("the layout must be a JSON object");
  const version = "version" in data ? data.version : LAYOUT_VERSION;
  if (version !== LAYOUT_VERSION) refusal ??= `unsupported layout version ${show(version)}`;
  const raw = data.boxes ?? [];
  if (!Array.isArray(raw)) return fail("'boxes' must be a list of box objects");
  if (!raw.length) refusal ??= "the layout has no boxes: draw at least one box and type its subject word";
  const boxes = [];
  for (const [i, b] of raw.entries()) {
    const r = readBox(i, b);
    refusal ??= r.problem;
    if (r.fatal) return fail(r.problem);
    boxes.push(r.box);
  }
  let canvas = null;
  const c = data.canvas;
  if (c && isNum(c.width) && isNum(c.height) && c.width > 0 && c.height > 0) canvas = { width: c.width, height: c.height };
  const extra = {};
  for (const [k, v] of Object.entries(data)) if (!["version", "boxes", "canvas"].includes(k)) extra[k] = v;
  return { boxes, canvas, extra, refusal };
}

/** x, y, w, h rounded to DECIMALS: the right/bottom edges are rounded, not the sizes, so boxes that touch stay
 * touching. */
function roundRect(r) {
  const x = round(r.x), y = round(r.y);
  return { x, y, w: round(round(r.x + r.w) - x), h: round(round(r.y + r.h) - y) };
}

const keyToJson = (f) => ({ t: round(f.t), ...roundRect(f), ...(f.extra || {}) });

function boxToJson(b) {
  const item = { subject: b.subject.trim(), ...roundRect(b) };
  if (isNum(b.weight)) item.weight = b.weight;
  if (b.frames?.length) item.frames = b.frames.map(keyToJson);
  Object.assign(item, b.extra || {});
  return objectJson(item);
}

/** {"k": v, ...} with a space after each colon and comma (a box's keyframes too), as the rest of the text. */
function objectJson(item) {
  const value = (v) => (Array.isArray(v) && v.every(isObject) ? `[${v.map(objectJson).join(", ")}]` : JSON.stringify(v));
  return "{" + Object.entries(item).map(([k, v]) => `${JSON.stringify(k)}: ${value(v)}`).join(", ") + "}";
}

/** The JSON text for a layout: one box per line (readable in the node's text box), unknown keys kept. */
export function formatLayout(boxes, canvas, extra) {
  let head = `{"version": ${LAYOUT_VERSION}`;
  for (const [k, v] of Object.entries(extra || {})) head += `, ${JSON.stringify(k)}: ${JSON.stringify(v)}`;
  if (canvas) head += `, "canvas": {"width": ${canvas.width}, "height": ${canvas.height}}`;
  if (!boxes.length) return head + `, "boxes": []}`;
  return head + `, "boxes": [\n  ` + boxes.map(boxToJson).join(",\n  ") + `\n]}`;
}

// ---- tracks: a box's keyframes over the clip (t = 0 first frame, 1 last) ----------------------------------

/** The box at clip time t: its keyframes linearly interpolated, held before the first and after the last; the
 * box itself (x, y, w, h) without keyframes. The same numbers as Box.at in cones2_core/layout.py (checked on
 * the fixture's `tracks`). Returns a new box without `frames`. */
export function boxAt(box, t) {
  const { frames, ...still } = box;
  const f = frames ?? [];
  if (!f.length) return still;
  let a, b, u;
  if (t <= f[0].t) [a, b, u] = [f[0], f[0], 0];
  else if (t >= f[f.length - 1].t) [a, b, u] = [f[f.length - 1], f[f.length - 1], 0];
  else {
    const i = f.findIndex((k, j) => j >= 1 && k.t >= t);
    [a, b] = [f[i - 1], f[i]];
    u = (t - a.t) / (b.t - a.t);
  }
  for (const k of COORDS) still[k] = (1 - u) * a[k] + u * b[k];
  return still;
}

/** The index of the box's keyframe at time t (equal once rounded to DECIMALS, as written), else -1. */
export function keyframeIndex(box, t) {
  return (box.frames ?? []).findIndex((f) => round(f.t) === round(t));
}

/** Keeps the box's own x, y, w, h equal to its track at t = 0 (what image models use). */
function syncStill(box) {
  if (box.frames?.length) Object.assign(box, roundRect(boxAt(box, 0)));
}

/** Sets the box's keyframe at time t to the rectangle r ({x, y, w, h}), in place. A box without a track gets one:
 * a keyframe at t = 0 where it stands now (unless t is 0), and the one at t. Returns the box. */
export function setKeyframe(box, t, r) {
  t = clamp(round(t), 0, 1);
  if (!box.frames?.length) box.frames = t > 0 ? [{ t: 0, ...roundRect(box), extra: {} }] : [];
  const rect = roundRect(r);
  const i = keyframeIndex(box, t);
  if (i >= 0) Object.assign(box.frames[i], rect, { t });
  else {
    box.frames.push({ t, ...rect, extra: {} });
    box.frames.sort((a, b) => a.t - b.t);
  }
  syncStill(box);
  return box;
}

/** Removes the box's keyframe at time t, in place; a track left with one keyframe becomes a still box there (the
 * same boxes at every t). Returns whether a keyframe was removed. */
export function deleteKeyframe(box, t) {
  const i = keyframeIndex(box, t);
  if (i < 0) return false;
  box.frames.splice(i, 1);
  if (box.frames.length === 1) Object.assign(box, roundRect(box.frames[0]));
  syncStill(box);
  if (box.frames.length < 2) delete box.frames;
  return true;
}

/** The faint path of a moving box: its centre at each keyframe, in time order ([] for a still box). */
export function trackPath(box) {
  return (box.frames ?? []).map((f) => ({ t: f.t, x: f.x + f.w / 2, y: f.y + f.h / 2 }));
}

export const snapValue = (v, snap) => (snap ? Math.round(v * GRID_STEPS) / GRID_STEPS : v);

/** What is under point p (image fractions): {index, mode: "resize", edges} within `tol` ({x, y}) of an edge,
 * else {index, mode: "move"} inside a box, else null. The selected box wins, then the topmost (last drawn). */
export function hitTest(boxes, selected, p, tol) {
  const order = [...boxes.keys()].reverse();
  if (selected >= 0 && selected < boxes.length) order.unshift(selected);
  for (const i of order) {
    const b = boxes[i];
    const inX = p.x >= b.x - tol.x && p.x <= b.x + b.w + tol.x, inY = p.y >= b.y - tol.y && p.y <= b.y + b.h + tol.y;
    if (!inX || !inY) continue;
    const edges = {
      l: Math.abs(p.x - b.x) <= tol.x, r: Math.abs(p.x - (b.x + b.w)) <= tol.x,
      t: Math.abs(p.y - b.y) <= tol.y, b: Math.abs(p.y - (b.y + b.h)) <= tol.y,
    };
    // a box thinner than two grab distances: take the nearer edge only
    if (edges.l && edges.r) edges[p.x < b.x + b.w / 2 ? "r" : "l"] = false;
    if (edges.t && edges.b) edges[p.y < b.y + b.h / 2 ? "b" : "t"] = false;
    if (edges.l || edges.r || edges.t || edges.b) return { index: i, mode: "resize", edges };
  }
  for (const i of order) {
    const b = boxes[i];
    if (p.x >= b.x && p.x <= b.x + b.w && p.y >= b.y && p.y <= b.y + b.h) return { index: i, mode: "move" };
  }
  return null;
}

/** The CSS cursor for a hitTest result. */
export function cursorFor(hit) {
  if (!hit) return "crosshair";
  if (hit.mode === "move") return "move";
  const { l, r, t, b } = hit.edges;
  if ((l && t) || (r && b)) return "nwse-resize";
  if ((r && t) || (l && b)) return "nesw-resize";
  return l || r ? "ew-resize" : "ns-resize";
}

/** The plain words of a prompt as the node finds them (cones2_core/prompt.py's rule, tested against the same
 * fixture: tests/fixtures/prompt_words.json): weight syntax "(dog:1.2)" removed, runs of letters and digits joined
 * by an apostrophe or a hyphen, lower-cased, in order, each once. */
export function promptWordList(text) {
  const cleaned = String(text ?? "").replace(/:\s*-?[0-9.]+\s*\)/g, " ").toLowerCase();
  return [...new Set(cleaned.match(/[\p{L}\p{N}]+(?:['-][\p{L}\p{N}]+)*/gu) ?? [])];
}

/** Subject suggestions from raw words: no stopwords, no repeats (case-insensitive), first spelling kept. */
export function suggestions(words) {
  const seen = new Set();
  return words.filter((w) => {
    const k = w.toLowerCase();
    if (STOPWORDS.has(k) || seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

/** The subject for a new box: the first suggested word no box has yet, else subjectN. */
export function nextSubject(boxes, words) {
  const used = new Set(boxes.map((b) => b.subject.trim().toLowerCase()));
  const word = words.find((w) => !used.has(w.toLowerCase()));
  if (word) return word;
  let n = boxes.length + 1;
  while (used.has(`subject${n}`)) n++;
  return `subject${n}`;
}

/** The maps of a `cones2_maps` ui entry that can be drawn: one per subject (the first), values in 0..1. */
export function readMaps(raw) {
  const subjects = [];
  for (const m of raw) {
    if (!m || typeof m.subject !== "string" || !Number.isInteger(m.h) || !Number.isInteger(m.w)) continue;
    if (m.h < 1 || m.w < 1 || !Array.isArray(m.values) || m.values.length !== m.h * m.w) continue;
    const key = m.subject.trim().toLowerCase();
    if (subjects.some((s) => s.key === key)) continue;
    subjects.push({ subject: m.subject, key, h: m.h, w: m.w, share: isNum(m.share) ? m.share : null,
      values: Float32Array.from(m.values, (v) => (isNum(v) ? clamp(v, 0, 1) : 0)) });
  }
  return subjects;
}
