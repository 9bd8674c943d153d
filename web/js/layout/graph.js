// Questions the editor asks the workflow graph: widgets and input slots, the generation size, the prompt's
// words, the source of an attention-maps event. Only exports (see model.js).
import { comfyApp } from "./comfy.js";
import { MAPS_NODE_TYPE, isNum, promptWordList, suggestions } from "./model.js";

export function widgetByName(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

export function inputSlot(node, name) {
  return node?.inputs?.findIndex((i) => i.name === name) ?? -1;
}

function sizeOf(node) {
  const w = widgetByName(node, "width")?.value, h = widgetByName(node, "height")?.value;
  return isNum(w) && isNum(h) && w > 0 && h > 0 ? { width: w, height: h } : null;
}

function graphNodes() {
  const g = comfyApp()?.graph;
  return g?.nodes ?? g?._nodes ?? [];
}

/** The generation size: the latent image feeding a sampler downstream of this node, else the first empty
 * latent in the graph; null when none is known. */
export function latentSize(node) {
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

/** Subject suggestions: the subjects of Load Residual nodes, then the words of the prompt that feeds this
 * node's conditioning (followed back a few nodes). */
export function promptWords(node) {
  const words = [];
  try {
    let n = node, hops = 0;
    while (n && hops++ < 6) {
      const slot = inputSlot(n, "conditioning");
      if (slot < 0) break;
      n = n.getInputNode(slot);
      const text = widgetByName(n, "text")?.value;
      if (typeof text === "string") {
        words.push(...promptWordList(text));
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
  return suggestions(words);
}

/** The Attention Maps node of an "executed" event, if its `model` input is linked straight to `node`. */
export function mapsSource(node, detail) {
  for (const id of [detail?.display_node, detail?.node]) {
    if (id === undefined || id === null) continue;
    for (const g of [node.graph, comfyApp()?.graph]) {
      const n = g?.getNodeById?.(id) ?? g?.getNodeById?.(Number(id));
      if (!n || (n.comfyClass ?? n.type) !== MAPS_NODE_TYPE) continue;
      const slot = inputSlot(n, "model");
      if (slot >= 0 && n.getInputNode(slot) === node) return n;
    }
  }
  return null;
}

/** Records an undo step now (the frontend's change tracker), rather than at its next mouseup/keyup. */
export function checkState() {
  try {
    comfyApp()?.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState();
  } catch (err) {
    // no change tracker (older frontend): the frontend's own mouseup/keyup checks still run
  }
}

/** Canvas pixels per CSS pixel: the screen's ratio times the graph's zoom (sharp when zoomed in), at most 4. */
export function pixelRatio() {
  const zoom = comfyApp()?.canvas?.ds?.scale ?? 1;
  return Math.min(4, (globalThis.devicePixelRatio || 1) * Math.max(1, zoom));
}

/** The graph canvas, to hand it wheel and middle-button events the editor does not use. */
export const graphCanvas = () => comfyApp()?.canvas;
