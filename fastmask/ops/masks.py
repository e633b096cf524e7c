# TEMPORARY placeholder, being replaced by the real module in this session.
def paste_masks(*a, **k):
    raise NotImplementedError("paste_masks is being written")
