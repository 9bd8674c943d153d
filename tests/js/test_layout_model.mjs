// The editor's model (web/js/layout/model.js) against the layout fixtures that the node's parser is tested
// with (tests/core/test_layout_fixtures.py): the same boxes for the valid texts, a refusal for the invalid
// ones. Run: node --test tests/js/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { formatLayout, hitTest, parseLayoutText } from "../../web/js/layout/model.js";

const CASES = JSON.parse(readFileSync(new URL("../fixtures/layouts.json", import.meta.url), "utf8"));
const plain = (boxes) => boxes.map(({ subject, x, y, w, h, weight }) => ({ subject, x, y, w, h, weight: weight ?? null }));

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
