"""fastmask's benchmark suite: ``python -m benchmarks.run`` in a checkout, ``fastmask-bench`` installed
(pyproject.toml installs this folder as ``fastmask.benchmarks``; its imports are relative for that)."""

# Every benchmark, in the order the runner takes them: name -> module (relative
# to this package) with ``run(quick, device)``.
# Kept here, free of torch, so that tools reading results (session_summary) run anywhere.
BENCHMARKS = {
    "roi_align": ".bench_roi_align",
    "nms": ".bench_nms",
    "proposals": ".bench_proposals",
    "mask_paste": ".bench_mask_paste",
    "model": ".bench_model",
}
