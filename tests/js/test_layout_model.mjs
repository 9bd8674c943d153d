// The editor's model (web/js/layout/model.js) against the layout fixtures that the node's parser is tested
// with (tests/core/test_layout_fixtures.py): the same boxes for the valid texts, a refusal for the invalid
// ones. Run: node --test tests/js/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  boxAt, deleteKeyframe, formatLayout, hitTest, keyframeIndex, parseLayoutText, setKeyframe, trackPath,
} from "../../web/js/layout/model.js";

const CASES = JSON.parse(readFileSync(new URL("../fixtures/layouts.json", import.meta.url), "utf8"));
const keys = (frames) => frames.map(({ t, x, y, w, h }) => ({ t, x, y, w, h }));
const plain = (boxes) => boxes.map(({ subject, x, y, w, h, weight, frames }) =>
  ({ subject, x, y, w, h, weight: weight ?? null, ...(frames ? { frames: keys(frames) } : {}) }));

for (const c of CASES.valid) {
  test(`valid: ${c.name}`, () => {
    const parsed = parseLayoutText(c.text);
    assert.equal(parsed.error, undefined);
    assert.equal(parsed.refusal, null);
    assert.deepEqual(plain(parsed.boxes), c.boxes);
  });
}

for (const c of CASES.invalid) {
  test(`invalid: ${c.name}`, () => {
    const parsed = parseLayoutText(c.text);
    assert.ok(parsed.refusal, `accepted: ${JSON.stringify(parsed)}`);
    assert.ok(parsed.refusal.includes(c.js_match ?? c.match), `"${parsed.refusal}" lacks "${c.js_match ?? c.match}"`);
  });
}

test("what the editor writes reads back as the same boxes, unknown keys kept", () => {
  for (const c of CASES.valid) {
    const parsed = parseLayoutText(c.text);
    const again = parseLayoutText(formatLayout(parsed.boxes, parsed.canvas, parsed.extra));
    assert.equal(again.refusal, null);
    assert.deepEqual(again.extra, parsed.extra);
    assert.deepEqual(again.boxes.map((b) => b.extra), parsed.boxes.map((b) => b.extra));
    for (const [a, b] of again.boxes.map((bx, i) => [bx, parsed.boxes[i]])) {
      for (const k of ["x", "y", "w", "h"]) assert.ok(Math.abs(a[k] - b[k]) <= 1e-4, `${c.name}: ${k}`);
      assert.equal(a.frames?.length, b.frames?.length, `${c.name}: keyframes`);
      for (const [fa, fb] of (a.frames ?? []).map((f, i) => [f, b.frames[i]])) {
        for (const k of ["t", "x", "y", "w", "h"]) assert.ok(Math.abs(fa[k] - fb[k]) <= 1e-4, `${c.name}: keyframe ${k}`);
        assert.deepEqual(fa.extra, fb.extra);
      }
    }
  }
});

test("boxes the node refuses are still drawn, inside the frame", () => {
  const parsed = parseLayoutText('{"boxes": [{"subject": "", "x": 0.7, "y": 1.5, "w": 0.4, "h": 0.2}]}');
  assert.equal(parsed.error, undefined);
  assert.match(parsed.refusal, /has no subject/);
  assert.deepEqual(plain(parsed.boxes), [{ subject: "", x: 0.7, y: 1, w: 1 - 0.7, h: 0, weight: null }]);
});

test("hit-testing: edges resize, the inside moves, the selected box wins", () => {
  const boxes = [{ x: 0.1, y: 0.1, w: 0.4, h: 0.4 }, { x: 0.3, y: 0.3, w: 0.4, h: 0.4 }];
  const tol = { x: 0.01, y: 0.01 };
  assert.deepEqual(hitTest(boxes, -1, { x: 0.4, y: 0.4 }, tol), { index: 1, mode: "move" });
  assert.deepEqual(hitTest(boxes, 0, { x: 0.4, y: 0.4 }, tol), { index: 0, mode: "move" });
  const corner = hitTest(boxes, -1, { x: 0.705, y: 0.695 }, tol);
  assert.equal(corner.mode, "resize");
  assert.deepEqual(corner.edges, { l: false, r: true, t: false, b: true });
  assert.equal(hitTest(boxes, -1, { x: 0.9, y: 0.9 }, tol), null);
});

for (const c of CASES.tracks) {
  test(`track interpolation (the numbers of Box.at): ${c.name}`, () => {
    const parsed = parseLayoutText(c.text);
    assert.equal(parsed.refusal, null);
    for (const want of c.at) {
      const got = boxAt(parsed.boxes[want.box], want.t);
      for (const k of ["x", "y", "w", "h"]) {
        assert.ok(Math.abs(got[k] - want[k]) <= 1e-12, `box ${want.box} at t=${want.t}: ${k} ${got[k]} != ${want[k]}`);
      }
      assert.equal(got.frames, undefined);
      assert.equal(got.subject, parsed.boxes[want.box].subject);
    }
  });
}

test("keyframes set by the editor: a track starts where the box stood, x/y/w/h follow t = 0", () => {
  const box = parseLayoutText('{"boxes": [{"subject": "dog", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}]}').boxes[0];
  setKeyframe(box, 1, { x: 0.6, y: 0.2, w: 0.3, h: 0.4 });
  assert.deepEqual(keys(box.frames), [{ t: 0, x: 0.1, y: 0.2, w: 0.3, h: 0.4 }, { t: 1, x: 0.6, y: 0.2, w: 0.3, h: 0.4 }]);
  assert.ok(Math.abs(boxAt(box, 0.5).x - 0.35) < 1e-12);
  // moving the box at t = 0 moves the track's start and the box's own coordinates with it
  setKeyframe(box, 0, { x: 0.2, y: 0.1, w: 0.2, h: 0.2 });
  assert.deepEqual([box.x, box.y, box.w, box.h], [0.2, 0.1, 0.2, 0.2]);
  assert.equal(box.frames.length, 2);
  // a keyframe between them; t equal once rounded to 4 decimals is the same keyframe (never two at one t)
  setKeyframe(box, 0.5, { x: 0.4, y: 0.5, w: 0.2, h: 0.2 });
  setKeyframe(box, 0.50001, { x: 0.45, y: 0.5, w: 0.2, h: 0.2 });
  assert.deepEqual(box.frames.map((f) => f.t), [0, 0.5, 1]);
  assert.equal(box.frames[1].x, 0.45);
  assert.equal(keyframeIndex(box, 0.5), 1);
  assert.equal(keyframeIndex(box, 0.25), -1);
  assert.deepEqual(trackPath(box).map((p) => [p.t, +p.x.toFixed(6), +p.y.toFixed(6)]),
    [[0, 0.3, 0.2], [0.5, 0.55, 0.6], [1, 0.75, 0.4]]);
  // what it writes, the node's parser reads: the fixture's refusals never fire on the editor's own text
  const text = formatLayout([box], null, {});
  const again = parseLayoutText(text);
  assert.equal(again.refusal, null);
  assert.deepEqual(keys(again.boxes[0].frames), keys(box.frames));
  // deleting keyframes: none at t = 0.25; the middle one goes; the last but one leaves a still box there
  assert.equal(deleteKeyframe(box, 0.25), false);
  assert.equal(deleteKeyframe(box, 0.5), true);
  assert.deepEqual(box.frames.map((f) => f.t), [0, 1]);
  assert.equal(deleteKeyframe(box, 0), true);
  assert.equal(box.frames, undefined);
  assert.deepEqual([box.x, box.y, box.w, box.h], [0.6, 0.2, 0.3, 0.4]);
  assert.ok(!formatLayout([box], null, {}).includes("frames"));
});

test("a keyframe set first at t > 0 keeps t = 0 where the box was; at t = 0 it is the only keyframe", () => {
  const a = { subject: "dog", x: 0.1, y: 0.1, w: 0.2, h: 0.2, extra: {} };
  setKeyframe(a, 0.3, { x: 0.5, y: 0.1, w: 0.2, h: 0.2 });
  assert.deepEqual(a.frames.map((f) => [f.t, f.x]), [[0, 0.1], [0.3, 0.5]]);
  assert.equal(a.x, 0.1);
  const b = { subject: "cat", x: 0.1, y: 0.1, w: 0.2, h: 0.2, extra: {} };
  setKeyframe(b, 0, { x: 0.3, y: 0.1, w: 0.2, h: 0.2 });
  assert.deepEqual(b.frames.map((f) => [f.t, f.x]), [[0, 0.3]]);
  assert.equal(b.x, 0.3);
});
