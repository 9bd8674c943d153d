// The widget's word list (web/js/layout/model.js promptWordList) against the cases the node's word rule is tested
// with (tests/core/test_prompt.py): both sides must offer and bind the same words. Run: node --test tests/js/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { promptWordList } from "../../web/js/layout/model.js";

const { cases } = JSON.parse(readFileSync(new URL("../fixtures/prompt_words.json", import.meta.url), "utf8"));

for (const c of cases) {
  test(`prompt words: ${JSON.stringify(c.text).slice(0, 40)}`, () => {
    assert.deepEqual(promptWordList(c.text), c.words);
  });
}
