"""Training difftool's pixel-space models (``difftool train superres|inpaint``, extra ``[train]``)."""
