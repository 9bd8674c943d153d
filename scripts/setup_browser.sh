#!/usr/bin/env bash
# Sets up what the browser tests (tests/browser) need, idempotently: Debian's Chromium (/usr/bin/chromium,
# via apt-get) and npm's playwright-core pinned by package-lock.json (npm ci when node_modules is missing
# or older than the lock). No browser is downloaded from anywhere else. Prints one summary line; exits
# non-zero with the reason when something cannot be set up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log="$(mktemp -t cones2-browser-setup.XXXXXX)"
trap 'rm -f "$log"' EXIT

fail() {
  echo "[cones2] browser set-up failed: $*" >&2
  [ -s "$log" ] && tail -n 25 "$log" >&2
  exit 1
}

chromium_bin="${CONES2_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium_bin" ]; then
  command -v apt-get >/dev/null || fail "$chromium_bin is missing and there is no apt-get to install chromium"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || fail "$chromium_bin is missing; install it with: apt-get install chromium"
    sudo="sudo -n"
  fi
  echo "[cones2] installing chromium with apt-get (once)"
  $sudo apt-get update -qq >>"$log" 2>&1 || fail "apt-get update"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >>"$log" 2>&1 || fail "apt-get install chromium"
  [ -x "$chromium_bin" ] || fail "chromium installed but $chromium_bin is missing"
fi

command -v node >/dev/null || fail "node (Node.js >= 18) is not on PATH"
command -v npm >/dev/null || fail "npm is not on PATH"
stamp="node_modules/.cones2-lock.sha256"
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -d node_modules/playwright-core ]; then
  npm ci --no-audit --no-fund --loglevel=error >>"$log" 2>&1 || fail "npm ci"
  echo "$want" >"$stamp"
fi
pw="$(node -e 'process.stdout.write(require("playwright-core/package.json").version)' 2>>"$log")" \
  || fail "playwright-core does not load"
ver="$("$chromium_bin" --version 2>/dev/null | head -n 1 || true)"
echo "[cones2] browser: ${ver:-chromium at $chromium_bin}, playwright-core $pw"
