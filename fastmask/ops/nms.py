# TEMPORARY placeholder, being replaced by the real module in this session.
def _todo(*a, **k):
    raise NotImplementedError("nms is being written")
nms = batched_nms = nms_keep_mask = _todo
