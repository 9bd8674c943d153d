"""Development harness (not loaded by ComfyUI): the real-host server runner, a small API client and the
tiny random-weight checkpoints. Used by the tests, the demo and the benchmarks."""
