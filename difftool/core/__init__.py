"""The model-agnostic heart of difftool.

Three interfaces (:class:`~difftool.core.scheduler.Scheduler`, :class:`~difftool.core.denoiser.Denoiser`,
:class:`~difftool.core.task.Task`), one sampling loop (:func:`~difftool.core.sampler.sample`) and image
I/O. Nothing here knows a model family, a GUI, the CLI, ONNX or TensorRT.
"""
