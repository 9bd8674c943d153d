// Box tracks in the layout editor, in one browser session against the real ComfyUI + frontend, like a user:
// turn "track" on, move a box at t = 0 and at t = 1 (keyframes), look at t = 0.5 (the box halfway, drawn
// there), save and load, delete a keyframe.
//   node tests/browser/tracks_scenario.js [--vue-nodes on|off] <server url> <workflow.json> <screenshot.png>
// Prints "RESULT {json}" with one entry per step, as layout_scenario.js does; a failing step stops the run.
'use strict';
const { openComfy, settle, run } = require('./browser_common');

const argv = process.argv.slice(2);
const settings = {};
if (argv[0] === '--vue-nodes') {
  settings['Comfy.VueNodes.Enabled'] = argv[1] === 'on';
  argv.splice(0, 2);
}
const [url, workflowPath, shotPath] = argv;
const NODE = 'Cones2LayoutGuidance';
const ROOMY = [460, 1000];

run(async () => {
  const out = { steps: {}, order: [] };
  const { browser, page, errors } = await openComfy(url, { viewport: { width: 1400, height: 1200 }, settings });
  try {
    await scenario(out, page);
  } catch (e) {
    out.failed = String(e && e.stack || e);
  }
  out.errors = errors.filter((e) => /cones2/i.test(e));
  await browser.close();
  return out;
});

async function scenario(out, page) {
  const step = async (name, fn) => {
    const t0 = Date.now();
    try {
      out.steps[name] = { ok: true, ...((await fn()) || {}), ms: Date.now() - t0 };
    } catch (e) {
      out.steps[name] = { ok: false, ms: Date.now() - t0, error: String(e && e.stack || e) };
      throw e;
    }
    out.order.push(name);
  };
  const assert = (cond, msg) => { if (!cond) throw new Error(msg); };
  const layoutNode = () => page.evaluate((type) => {
    const n = window.app.graph.nodes.find((x) => x.type === type);
    return n ? { id: n.id, value: n.widgets.find((w) => w.name === 'layout').value, state: n.cones2Layout?.state() } : null;
  }, NODE);
  const editorSel = (cls) => page.evaluateHandle(([type, c]) =>
    window.app.graph.nodes.find((x) => x.type === type).cones2Layout.root.querySelector(c), [NODE, cls]);
  const rect = async () => (await layoutNode()).state.rect;
  const at = (r, fx, fy) => [r.left + fx * r.width, r.top + fy * r.height];
  const drag = async (from, to) => {
    await page.mouse.move(from[0], from[1]);
    await page.mouse.down();
    await page.mouse.move(to[0], to[1], { steps: 8 });
    await page.mouse.up();
    await settle(page, 50);
  };
  const pixel = (fx, fy) => page.evaluate(([type, x, y]) => {
    const c = window.app.graph.nodes.find((n) => n.type === type).cones2Layout.canvas;
    const d = c.getContext('2d').getImageData(Math.floor(x * c.width), Math.floor(y * c.height), 1, 1).data;
    return [d[0], d[1], d[2]];
  }, [NODE, fx, fy]);
  const diff = (p, q) => Math.abs(p[0] - q[0]) + Math.abs(p[1] - q[1]) + Math.abs(p[2] - q[2]);
  const near = (a, b, tol) => ['x', 'y', 'w', 'h'].every((k) => Math.abs(a[k] - b[k]) <= tol);
  const setTime = async (t) => {
    await (await editorSel('.c2-time')).fill(String(t));   // the slider, as a user drags it (input events)
    await settle(page, 50);
    const st = (await layoutNode()).state;
    assert(Math.abs(st.time - t) < 1e-9, `the slider set t = ${st.time}, not ${t}`);
    return st;
  };
  const timeRowShown = () => page.evaluate((type) => {
    const ed = window.app.graph.nodes.find((x) => x.type === type).cones2Layout;
    const r = ed.timeSlider.getBoundingClientRect();
    return { hidden: ed.timeRow.hidden, width: r.width, height: r.height, checked: ed.trackBox.checked };
  }, NODE);
  const loadWorkflow = async (wf) => {
    await page.evaluate(async ([wf, type, size]) => {
      const app = window.app;
      await app.extensionManager?.setting?.set?.('Comfy.Minimap.Visible', false);
      await app.loadGraphData(wf);
      const n = app.graph.nodes.find((x) => x.type === type);
      n.setSize(size);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [-n.pos[0] + 80, -n.pos[1] + 60];
      app.canvas.setDirty(true, true);
    }, [wf, NODE, ROOMY]);
    await page.waitForFunction((type) => window.app.graph.nodes.find((x) => x.type === type)?.cones2Layout
      ?.state().shown, NODE, { timeout: 5000 });
    await settle(page, 400);
  };

  // the dog's keyframes the mouse sets below (fractions of the frame); the cat stays still
  const K0 = { x: 0.15, y: 0.30, w: 0.25, h: 0.30 };
  const K1 = { x: 0.55, y: 0.10, w: 0.15, h: 0.30 };
  const MID = { x: 0.35, y: 0.20, w: 0.20, h: 0.30 };   // their average: the dog at t = 0.5
  let tol = 0;

  await step('track_off_for_images', async () => {
    await loadWorkflow(JSON.parse(require('fs').readFileSync(workflowPath, 'utf8')));
    const n = await layoutNode();
    const row = await timeRowShown();
    // an image layout: no slider until the user asks for a track
    assert(n.state.boxes.length === 2 && !n.state.tracking && row.hidden && !row.checked && row.height === 0,
      `a layout without tracks should hide the time slider: ${JSON.stringify({ row, state: n.state })}`);
    return { row };
  });

  await step('track_on_shows_the_slider', async () => {
    await (await editorSel('.c2-clear')).click();
    await (await editorSel('.c2-track')).check();
    await settle(page, 200);
    const row = await timeRowShown();
    const st = (await layoutNode()).state;
    assert(st.tracking && st.time === 0 && !row.hidden && row.width > 80 && row.height > 0,
      `track on: ${JSON.stringify({ row, tracking: st.tracking, time: st.time })}`);
    const r = st.rect;
    assert(r.width > 200 && r.height > 200, `the frame is too small with the slider shown: ${JSON.stringify(r)}`);
    // two new boxes: the dog where its track starts, less 0.05 in x; the cat, which never moves
    await drag(at(r, 0.10, 0.30), at(r, 0.35, 0.60));
    await page.keyboard.type('dog');
    await drag(at(r, 0.60, 0.70), at(r, 0.90, 0.95));
    await page.keyboard.type('cat');
    await settle(page, 50);
    const boxes = JSON.parse((await layoutNode()).value).boxes;
    assert(boxes.length === 2 && boxes.every((b) => !('frames' in b)),
      `new boxes should hold still (no keyframes) until moved: ${JSON.stringify(boxes)}`);
    tol = 1 / r.width + 1e-4;   // one canvas pixel (+ the 4-decimal rounding)
    return { row, rect: r };
  });

  await step('keyframe_at_0', async () => {
    const r = await rect();
    // move the dog right by 0.05 at t = 0: its keyframe at t = 0
    const mid = at(r, 0.225, 0.45);
    await drag(mid, [mid[0] + 0.05 * r.width, mid[1]]);
    const layout = JSON.parse((await layoutNode()).value);
    const dog = layout.boxes.find((b) => b.subject === 'dog');
    assert(dog.frames?.length === 1 && dog.frames[0].t === 0 && near(dog.frames[0], K0, tol) && near(dog, K0, tol),
      `the dog moved at t = 0 should have one keyframe at t = 0 equal to its box ${JSON.stringify(K0)}: `
      + JSON.stringify(dog));
    return { layout };
  });

  await step('keyframe_at_1', async () => {
    const r = await rect();
    let st = await setTime(1);
    const dogAt1 = st.shownBoxes.find((b) => b.subject === 'dog');
    assert(near(dogAt1, K0, tol), `before a keyframe at 1 the dog holds its t = 0 place: ${JSON.stringify(dogAt1)}`);
    // at t = 1: move it by (+0.40, -0.20), then narrow it by its right edge (-0.10)
    const mid = at(r, K0.x + K0.w / 2, K0.y + K0.h / 2);
    await drag(mid, [mid[0] + 0.40 * r.width, mid[1] - 0.20 * r.height]);
    const edge = at(r, K1.x + K0.w, K1.y + K1.h / 2);
    await drag(edge, [edge[0] - 0.10 * r.width, edge[1]]);
    const n = await layoutNode();
    st = n.state;
    const layout = JSON.parse(n.value);
    const dog = layout.boxes.find((b) => b.subject === 'dog');
    const cat = layout.boxes.find((b) => b.subject === 'cat');
    assert(dog.frames?.length === 2 && dog.frames[0].t === 0 && dog.frames[1].t === 1,
      `keyframes at 0 and 1 expected: ${JSON.stringify(dog)}`);
    assert(near(dog.frames[0], K0, tol) && near(dog.frames[1], K1, tol),
      `keyframes ${JSON.stringify(dog.frames)} != ${JSON.stringify([K0, K1])}`);
    assert(['x', 'y', 'w', 'h'].every((k) => dog[k] === dog.frames[0][k]),
      `the box's own x, y, w, h must stay the track at t = 0: ${JSON.stringify(dog)}`);
    assert(!('frames' in cat), `the cat was never moved: ${JSON.stringify(cat)}`);
    // the keyframe under the slider can be deleted; the numeric fields show the box at t = 1
    const controls = await page.evaluate((type) => {
      const ed = window.app.graph.nodes.find((x) => x.type === type).cones2Layout;
      return { delKey: !ed.delKeyButton.disabled, x: ed.numInputs.x.value, ticks: [...ed.keyList.options].map((o) => o.value) };
    }, NODE);
    assert(controls.delKey && Math.abs(parseFloat(controls.x) - dog.frames[1].x) < 1e-9
      && JSON.stringify(controls.ticks) === '["0","1"]', `controls at t = 1: ${JSON.stringify(controls)}`);
    return { layout, text: n.value, keyframes: dog.frames, controls };
  });

  await step('interpolated_at_half', async () => {
    const bg0 = await pixel(0.45, 0.45);          // t = 1 now: background there
    let st = await setTime(0);
    const atZero = { inOld: await pixel(0.20, 0.55), inMid: await pixel(0.45, 0.45), dot: await pixel(0.625, 0.25) };
    st = await setTime(0.5);
    const dog = st.shownBoxes.find((b) => b.subject === 'dog');
    const keys = st.boxes.find((b) => b.subject === 'dog').frames;
    const expect = Object.fromEntries(['x', 'y', 'w', 'h'].map((k) => [k, (keys[0][k] + keys[1][k]) / 2]));
    assert(near(dog, expect, 1e-12) && near(dog, MID, 2 * tol), `the dog at t = 0.5: ${JSON.stringify(dog)}, `
      + `expected ${JSON.stringify(expect)}`);
    const cat = st.shownBoxes.find((b) => b.subject === 'cat');
    assert(near(cat, st.boxes.find((b) => b.subject === 'cat'), 0), 'the still cat moved');
    // the canvas draws the dog halfway: (0.45, 0.45) is inside it only at t = 0.5, (0.20, 0.55) only at t = 0
    const atHalf = { inOld: await pixel(0.20, 0.55), inMid: await pixel(0.45, 0.45), dot: await pixel(0.625, 0.25) };
    assert(diff(atHalf.inMid, atZero.inOld) <= 6 && diff(atHalf.inMid, atZero.inMid) > 30 && diff(bg0, atHalf.inMid) > 30,
      `t = 0.5: the dog's fill should be at (0.45, 0.45): ${JSON.stringify({ atZero, atHalf, bg0 })}`);
    assert(diff(atHalf.inOld, atZero.inMid) <= 6, `t = 0.5: (0.20, 0.55) should be empty: ${JSON.stringify({ atZero, atHalf })}`);
    // the track: a faint dashed path from centre to centre, a dot at each keyframe's centre (the t = 1 one at
    // (0.625, 0.25), on a grid line: compared with the same line where nothing is drawn)
    const line = await pixel(0.97, 0.25);
    assert(diff(atHalf.dot, line) > 30, `no keyframe dot on the track: ${JSON.stringify({ atHalf, line })}`);
    const path = await page.evaluate(([type, box]) => {
      const c = window.app.graph.nodes.find((n) => n.type === type).cones2Layout.canvas;
      const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const bg = [27, 27, 31];   // render.js's background
      let drawn = 0, seen = 0;
      for (let i = 1; i < 40; i++) {   // points on the segment between the two centres, off the box and the grid
        const s = i / 40, fx = 0.275 + s * 0.35, fy = 0.45 - s * 0.2;
        const x = Math.round(fx * c.width), y = Math.round(fy * c.height);
        const onGrid = [0.25, 0.5, 0.75].some((g) => Math.abs(fx - g) * c.width < 3 || Math.abs(fy - g) * c.height < 3);
        if (onGrid || (fx > box.x - 0.01 && fx < box.x + box.w + 0.01 && fy > box.y - 0.01 && fy < box.y + box.h + 0.01)) continue;
        if (Math.hypot(fx - 0.275, fy - 0.45) * c.width < 8 || Math.hypot(fx - 0.625, fy - 0.25) * c.width < 8) continue;
        seen++;
        const k = 4 * (y * c.width + x);
        if (Math.abs(data[k] - bg[0]) + Math.abs(data[k + 1] - bg[1]) + Math.abs(data[k + 2] - bg[2]) > 30) drawn++;
      }
      return { drawn, seen };
    }, [NODE, dog]);
    assert(path.seen >= 10 && path.drawn >= 0.3 * path.seen, `no dashed path between the keyframes: ${JSON.stringify(path)}`);
    const delKey = await page.evaluate((type) =>
      !window.app.graph.nodes.find((x) => x.type === type).cones2Layout.delKeyButton.disabled, NODE);
    assert(!delKey, 'Delete key is enabled at t = 0.5, where the dog has no keyframe');
    return { dog, atZero, atHalf, path };
  });

  await step('api_prompt_and_reload', async () => {
    const before = await layoutNode();
    const sent = await page.evaluate(async ([type]) => {
      const n = window.app.graph.nodes.find((x) => x.type === type);
      const p = await window.app.graphToPrompt();
      return { layout: p.output[String(n.id)].inputs.layout, extra: JSON.stringify(p.workflow?.extra ?? {}),
        wf: JSON.parse(JSON.stringify(window.app.graph.serialize())) };
    }, [NODE]);
    assert(sent.layout === before.value, 'the API prompt does not carry the layout text as it is');
    assert(!sent.extra.includes('frames'), `the track leaked into the workflow's extra: ${sent.extra.slice(0, 300)}`);
    const wfNode = sent.wf.nodes.find((x) => x.type === NODE);
    assert(wfNode.widgets_values[0] === before.value && wfNode.widgets_values.length === 11,  // the node's 11 widgets
      `widgets_values: ${JSON.stringify(wfNode.widgets_values).slice(0, 300)}`);
    // loading it again: the slider shows, for the layout has tracks
    await loadWorkflow(sent.wf);
    const after = await layoutNode();
    const row = await timeRowShown();
    assert(after.value === before.value && after.state.tracking && !row.hidden && row.checked,
      `reloaded: ${JSON.stringify({ row, tracking: after.state.tracking })}`);
    return { layout: sent.layout };
  });

  await step('delete_keyframe', async () => {
    let st = await setTime(1);
    await settle(page, 100);
    if (shotPath) {   // the editor with the track at t = 1
      const clip = await page.evaluate((type) => {
        const r = window.app.graph.nodes.find((x) => x.type === type).cones2Layout.root.getBoundingClientRect();
        return { x: r.left, y: r.top, width: r.width, height: r.height };
      }, NODE);
      await page.screenshot({ path: shotPath, clip });
    }
    const dotBefore = await pixel(0.625, 0.25);
    // select the dog at t = 1, then the Delete key button
    await page.mouse.click(...at(st.rect, 0.625, 0.35));
    await settle(page, 50);
    assert((await layoutNode()).state.selected === 0, 'the dog is not selected');
    await (await editorSel('.c2-delkey')).click();
    await settle(page, 100);
    const n = await layoutNode();
    st = n.state;
    const dog = JSON.parse(n.value).boxes.find((b) => b.subject === 'dog');
    // one keyframe left: the dog holds still there (the same boxes at every t), written as a still box
    assert(!('frames' in dog) && near(dog, K0, tol), `after deleting the t = 1 keyframe: ${JSON.stringify(dog)}`);
    assert(near(st.shownBoxes[0], K0, tol), `the dog at t = 1 is drawn at ${JSON.stringify(st.shownBoxes[0])}`);
    const bg = await pixel(0.97, 0.25);   // empty, on the same grid line as the dot
    const dotAfter = await pixel(0.625, 0.25);
    assert(diff(dotBefore, bg) > 30 && diff(dotAfter, bg) <= 6,
      `the track's dot should go with the keyframe: ${JSON.stringify({ dotBefore, dotAfter, bg })}`);
    // the frontend's undo brings the keyframe back
    await (await editorSel('canvas')).focus();
    await page.keyboard.press('Control+z');
    await page.waitForFunction((type) => {
      const ed = window.app.graph.nodes.find((x) => x.type === type)?.cones2Layout;
      return ed && ed.boxes[0]?.frames?.length === 2;
    }, NODE, { timeout: 5000 }).catch(() => { throw new Error('undo did not bring the keyframe back'); });
    return { dog, shot: shotPath };
  });
}
