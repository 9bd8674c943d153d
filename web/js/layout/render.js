// Drawing the layout on the editor's canvas: grid, attention-map heatmaps, boxes with their labels and the
// selected box's handles. Only exports (see model.js).
import { GRID_STEPS, isNum } from "./model.js";

const PALETTE = [
  "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#aaffc3", "#808000", "#ffd8b1",
];
const MAPS_ALPHA = 0.8;   // opacity of the heatmaps (each pixel's own alpha is the map's value)
const HANDLES = [[0, 0], [0.5, 0], [1, 0], [0, 0.5], [1, 0.5], [0, 1], [0.5, 1], [1, 1]];

const subjectKey = (b) => b.subject.trim().toLowerCase();

/** One colour per subject (boxes of one subject share it), in order of first appearance. */
function subjectColours(boxes) {
  const map = new Map();
  for (const b of boxes) {
    const k = subjectKey(b);
    if (!map.has(k)) map.set(k, PALETTE[map.size % PALETTE.length]);
  }
  return map;
}

function rgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

/** Black or white, whichever reads better on `hex`. */
function textColour(hex) {
  const [r, g, b] = rgb(hex);
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000000" : "#ffffff";
}

/** The map as a tiny w×h canvas: the colour, with each pixel's alpha = the map's value; cached in `cache`. */
function mapImage(m, colour, cache) {
  const cacheKey = `${m.key}|${colour}`;
  let img = cache.get(cacheKey);
  if (img) return img;
  img = document.createElement("canvas");
  img.width = m.w;
  img.height = m.h;
  const [r, g, b] = rgb(colour);
  const ctx = img.getContext("2d");
  const data = ctx.createImageData(m.w, m.h);
  for (let i = 0; i < m.values.length; i++) data.data.set([r, g, b, Math.round(255 * m.values[i])], 4 * i);
  ctx.putImageData(data, 0, 0);
  cache.set(cacheKey, img);
  return img;
}

/** Every subject's heatmap over the whole frame (bilinear), in its box colour; subjects without a box get
 * the next colours of the palette. */
function drawMaps(ctx, W, H, maps, colours, cache) {
  let extra = colours.size;
  ctx.save();
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = MAPS_ALPHA;
  for (const m of maps) {
    const colour = colours.get(m.key) ?? PALETTE[extra++ % PALETTE.length];
    ctx.drawImage(mapImage(m, colour, cache), 0, 0, W, H);
  }
  ctx.restore();
}

function drawGrid(ctx, W, H, snap) {
  // quarters always, the snapping grid when snapping
  const steps = snap ? GRID_STEPS : 4;
  ctx.strokeStyle = snap ? "rgba(255,255,255,0.12)" : "rgba(255,255,255,0.07)";
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
}

function drawBox(ctx, r, { col, sel, dim, label, font, pr }) {
  ctx.globalAlpha = dim ? 0.15 : sel ? 0.35 : 0.22;
  ctx.fillStyle = col;
  ctx.fillRect(r.x, r.y, r.w, r.h);
  ctx.globalAlpha = dim ? 0.5 : 1;
  ctx.strokeStyle = col;
  ctx.lineWidth = (sel ? 3 : 2) * pr;
  ctx.strokeRect(r.x + ctx.lineWidth / 2, r.y + ctx.lineWidth / 2, r.w - ctx.lineWidth, r.h - ctx.lineWidth);
  if (sel) {
    ctx.setLineDash([4 * pr, 3 * pr]);
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = pr;
    ctx.strokeRect(r.x + 0.5, r.y + 0.5, r.w - 1, r.h - 1);
    ctx.setLineDash([]);
  }
  // label tag, clipped to the box's width
  const pad = 3 * pr;
  const tw = Math.min(ctx.measureText(label).width + 2 * pad, Math.max(r.w, 20 * pr));
  ctx.fillStyle = col;
  ctx.fillRect(r.x, r.y, tw, font + 2 * pad);
  ctx.fillStyle = textColour(col);
  ctx.save();
  ctx.beginPath();
  ctx.rect(r.x, r.y, tw, font + 2 * pad);
  ctx.clip();
  ctx.fillText(label, r.x + pad, r.y + pad);
  ctx.restore();
  if (sel) {
    const hs = 4 * pr;
    ctx.fillStyle = "#ffffff";
    ctx.strokeStyle = "#000000";
    ctx.lineWidth = pr;
    for (const [hx, hy] of HANDLES) {
      const cx = r.x + hx * r.w, cy = r.y + hy * r.h;
      ctx.fillRect(cx - hs, cy - hs, 2 * hs, 2 * hs);
      ctx.strokeRect(cx - hs, cy - hs, 2 * hs, 2 * hs);
    }
  }
  ctx.globalAlpha = 1;
}

/** The faint path of a moving box's centre through its keyframes (a dot at each, ringed where `now` is one). */
function drawTrack(ctx, W, H, path, { col, sel, pr, now }) {
  ctx.save();
  ctx.globalAlpha = sel ? 0.75 : 0.4;
  ctx.strokeStyle = col;
  ctx.fillStyle = col;
  ctx.lineWidth = 1.5 * pr;
  ctx.setLineDash([5 * pr, 4 * pr]);
  ctx.beginPath();
  path.forEach((p, i) => (i ? ctx.lineTo(p.x * W, p.y * H) : ctx.moveTo(p.x * W, p.y * H)));
  ctx.stroke();
  ctx.setLineDash([]);
  for (const p of path) {
    ctx.beginPath();
    ctx.arc(p.x * W, p.y * H, 3 * pr, 0, 2 * Math.PI);
    ctx.fill();
    if (p.t === now) {
      ctx.strokeStyle = "#ffffff";
      ctx.beginPath();
      ctx.arc(p.x * W, p.y * H, 5 * pr, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.strokeStyle = col;
    }
  }
  ctx.restore();
}

/** Draws the whole frame on ctx (W×H device pixels, `pr` device pixels per CSS pixel). `view`: {boxes,
 * selected, snap, dim (the text is broken: boxes shown faded), maps (subjects to draw, or null), cache, tracks
 * (per box, the centre path of its keyframes to draw faintly, or null), now (the time shown, its keyframes
 * ringed)}. `boxes` are the boxes at the time shown.
 * Returns each box's label, in box order. */
export function drawLayout(ctx, W, H, pr, view) {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#1b1b1f";
  ctx.fillRect(0, 0, W, H);
  drawGrid(ctx, W, H, view.snap);
  const colours = subjectColours(view.boxes);
  if (view.maps) drawMaps(ctx, W, H, view.maps, colours, view.cache);
  view.tracks?.forEach((path, i) => {
    if (path.length > 1) {
      drawTrack(ctx, W, H, path, { col: colours.get(subjectKey(view.boxes[i])), sel: i === view.selected, pr,
        now: view.now });
    }
  });
  const font = Math.max(9, Math.round(11 * pr));
  ctx.font = `${font}px sans-serif`;
  ctx.textBaseline = "top";
  const labels = view.boxes.map((b, i) => {
    const map = view.maps?.find((m) => m.key === subjectKey(b));
    const label = (b.subject.trim() || "(no subject)") + (isNum(b.weight) ? ` ×${b.weight}` : "")
      + (map && map.share !== null ? ` ${Math.round(map.share * 100)}%` : "");
    drawBox(ctx, { x: b.x * W, y: b.y * H, w: b.w * W, h: b.h * H },
      { col: colours.get(subjectKey(b)), sel: i === view.selected, dim: view.dim, label, font, pr });
    return label;
  });
  if (!view.boxes.length) {
    ctx.fillStyle = "rgba(255,255,255,0.45)";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("drag to draw a box", W / 2, H / 2);
    ctx.textAlign = "left";
  }
  return labels;
}
