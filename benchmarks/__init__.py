"""fastmask's benchmark suite (``python -m benchmarks.run``)."""

# Every benchmark, in the order the runner takes them: name -> module with ``run(quick, device)``.
# Kept here, free of torch, so that tools reading results (session_summary) run anywhere.
BENCHMARKS = {
    "roi_align": "benchmarks.bench_roi_align",
    "nms": "benchmarks.bench_nms",
    "proposals": "benchmarks.bench_proposals",
    "mask_paste": "benchmarks.bench_mask_paste",
    "model": "benchmarks.bench_model",
}
