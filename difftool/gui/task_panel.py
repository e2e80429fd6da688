"""The task panel: task picker, the form generated from its parameters, model, backend (with its declared
options), device, precision, seed, Run, and the queue.

It offers only what the chosen task declares (its model families; no backend rows for a task without a
model) and keeps each task's last values, in the window and across restarts.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from difftool.core.task import RegistryView
from difftool.gui import wheel
from difftool.gui.control_units import ControlUnitsField, is_control_param
from difftool.gui.focus import focus_chain
from difftool.gui.form import DEFAULT_CHOICE, ParamForm
from difftool.gui.messages import for_the_window
from difftool.gui.model_field import ModelNameField, offers_models, runs_family
from difftool.gui.prompt_tools import attach_prompt_history
from difftool.gui.reference_field import ReferenceImagesField, is_image_list

NO_MODEL = "(choose a model)"  # the model box's first entry for a task with no default model
FAMILY_ROLE = Qt.ItemDataRole.UserRole + 1  # a listed model's family (models added by Browse have none)


def cuda_devices() -> list[str]:
    """``cuda:N`` for each GPU the CUDA runtime reports."""
    try:
        from difftool.core.cuda import runtime

        return [f"cuda:{i}" for i in range(runtime().device_count())]
    except ImportError:
        return []


class TaskPanel(QWidget):
    """What to run and how; :meth:`request` gives the task name, its parameters and the run options."""

    def __init__(
        self,
        registry: RegistryView,
        settings: QSettings,
        on_run: Callable[[], Any],
        on_cancel: Callable[[], None],
        source: Callable[[], Any] | None = None,
        source_path: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.registry, self.settings = registry, settings
        self.source = source or (lambda: None)  # the image open in the window (ControlNet previews)
        self.source_path = source_path or (lambda: None)  # its file, if it is one
        layout = QVBoxLayout(self)
        self.task_box = QComboBox()
        for name, entry in sorted(registry.tasks.items()):
            self.task_box.addItem(name)
            summary = for_the_window(entry.value.summary, [p.name for p in entry.value.params])[0]  # GUI words
            self.task_box.setItemData(self.task_box.count() - 1, summary, Qt.ItemDataRole.ToolTipRole)
        self.task_box.currentTextChanged.connect(self.on_task_changed)
        task_label = QLabel("&Task")  # Alt+T reaches the task box from anywhere
        task_label.setBuddy(self.task_box)
        layout.addWidget(task_label)
        layout.addWidget(self.task_box)
        self.task_status = QLabel()
        self.task_status.setWordWrap(True)
        layout.addWidget(self.task_status)
        self.form_area = QScrollArea()
        self.form_area.setWidgetResizable(True)
        # The form fits the panel's width (long rows wrap their field under the label): never sideways.
        self.form_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        layout.addWidget(self.form_area, 1)

        common = self.common = QFormLayout()
        self.form: ParamForm | None = None
        self._family_set: dict[str, Any] = {}  # what the picked model's family put in the form
        self.model_box = QComboBox()
        self.model_box.addItem(DEFAULT_CHOICE)
        found = self.models = registry.find_models()
        self.controlnets = [entry.name for entry in found if entry.family.endswith("controlnet")]
        for entry in found:
            self.model_box.addItem(entry.name, str(entry.path))
            self.model_box.setItemData(self.model_box.count() - 1, entry.family, FAMILY_ROLE)
        self.model_box.addItem("Browse…")
        self.model_box.addItem("Browse file…")
        self.model_box.activated.connect(self._on_model_picked)
        self.backend_box = QComboBox()
        self.backend_box.currentTextChanged.connect(self._on_backend_changed)
        self.device_box = QComboBox()
        self.device_box.addItems(getattr(registry, "devices", None) or ["cpu", *cuda_devices()])
        self.device_box.currentTextChanged.connect(self.refresh_backends)
        self.dtype_box = QComboBox()
        self.dtype_box.addItems(["auto", "fp32", "fp16", "bf16"])
        self.seed_box = QSpinBox()
        self.seed_box.setRange(-1, 2**31 - 1)
        self.seed_box.setSpecialValueText("random")
        self.seed_box.setValue(-1)
        # A fixed seed makes every later job repeat the same noise: the field says so, and one click undoes it.
        self.seed_random = QPushButton("random")
        self.seed_random.setToolTip("a new random seed for every job (each result's seed is in its record)")
        self.seed_random.clicked.connect(lambda: self.seed_box.setValue(-1))
        self.seed_box.valueChanged.connect(self._show_seed)
        seed_row = QHBoxLayout()
        seed_row.setContentsMargins(0, 0, 0, 0)
        seed_row.addWidget(self.seed_box, 1)
        seed_row.addWidget(self.seed_random)
        self.seed_row = QWidget()
        self.seed_row.setLayout(seed_row)
        self._show_seed()
        common.addRow("model", self.model_box)
        common.addRow("backend", self.backend_box)
        common.addRow("device", self.device_box)
        common.addRow("precision", self.dtype_box)
        common.addRow("seed", self.seed_row)
        layout.addLayout(common)
        self.options_box = QGroupBox("backend options")
        self.options_box.setCheckable(True)  # folded by default: the task's form gets the room
        self.options_box.setChecked(False)
        self.options_box.toggled.connect(lambda on: self.options_form is not None and self.options_form.setVisible(on))
        self.options_layout = QVBoxLayout(self.options_box)
        self.options_form: ParamForm | None = None
        layout.addWidget(self.options_box)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(on_run)
        reset = QPushButton("Defaults")
        reset.clicked.connect(lambda: self.form is not None and self.form.reset())
        buttons.addWidget(self.run_button)
        buttons.addWidget(reset)
        layout.addLayout(buttons)
        layout.addWidget(QLabel("Queue"))
        self.queue_list = QListWidget()
        self.queue_list.setMaximumHeight(84)  # four rows
        self.queue_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # "#3 inpaint — … step 4 / 20"
        layout.addWidget(self.queue_list)
        cancel_selected = QPushButton("Cancel selected job")
        cancel_selected.clicked.connect(on_cancel)
        layout.addWidget(cancel_selected)
        self.backend_box.setCurrentText(str(settings.value("backend", "torch")))
        self.refresh_backends()
        self.keep_wheel()

    def refresh_backends(self) -> None:
        """List every backend; those that cannot run on the chosen device are disabled, with the reason."""
        current = self.backend_box.currentText() or "torch"
        self.backend_box.blockSignals(True)
        self.backend_box.clear()
        for name, entry in sorted(self.registry.backends.items()):
            backend = entry.value
            reason = backend.unavailable_reason(self.device_box.currentText())
            self.backend_box.addItem(name)
            index = self.backend_box.count() - 1
            tip = for_the_window(reason or backend.summary, [])[0]  # "set "device" to cuda", not a flag
            self.backend_box.setItemData(index, tip, Qt.ItemDataRole.ToolTipRole)
            if reason:
                self.backend_box.model().item(index).setEnabled(False)
        self.backend_box.setCurrentText(current if current in self.registry.backends else "torch")
        self.backend_box.blockSignals(False)
        self._on_backend_changed()

    def _on_backend_changed(self) -> None:
        """Show the chosen backend's declared options as a form (nothing when it declares none)."""
        if self.options_form is not None:
            self.options_form.setParent(None)
            self.options_form = None
        found = self.registry.backends.get(self.backend_box.currentText())
        options = found.value.options if found else ()
        if options:
            self.options_form = ParamForm(types.SimpleNamespace(params=options), {})
            self.options_form.setVisible(self.options_box.isChecked())
            self.options_layout.addWidget(self.options_form)
            self.fix_tab_order()
            self.keep_wheel()
        task = self.registry.tasks.get(self.task_box.currentText())
        self.options_box.setVisible(bool(options) and (task is None or task.value.uses_model))

    def on_task_changed(self) -> None:
        name = self.task_box.currentText()
        if not name:
            return
        self.remember()
        task = self.registry.task(name)
        from difftool.app.plan import param_choices

        choices = {p.name: tuple(map(str, param_choices(p, self.registry))) for p in task.params if p.type == "choice"}
        editors = {p.name: self._control_editor for p in task.params if is_control_param(p)}
        editors |= {p.name: self._model_editor for p in task.params if offers_models(p)}
        from difftool.gui.remote import RemoteRegistry

        if not isinstance(self.registry, RemoteRegistry):  # a server's references are its paths: typed, not dropped
            editors |= {p.name: ReferenceImagesField for p in task.params if is_image_list(p)}
        self.form = ParamForm(task, choices, editors)
        self._family_set = {}
        attach_prompt_history(self.form, self.settings)
        for key, value in self._remembered(name).items():
            try:
                self.form.set_values({key: value})
            except (TypeError, ValueError):  # a value of an older version of the task: keep the default
                continue
        self.form_area.setWidget(self.form)
        self._offer_models(task)
        self._show_availability()
        for widget in (self.model_box, self.backend_box, self.device_box, self.dtype_box):
            self.common.setRowVisible(widget, task.uses_model)  # a task that loads no model has no backend
        self.options_box.setVisible(task.uses_model and self.options_form is not None)
        self.settings.setValue("task", name)
        self.fix_tab_order()
        self.keep_wheel()

    def keep_wheel(self) -> None:
        """The scroll wheel scrolls the panel; it changes only the box the artist clicked or tabbed into."""
        wheel.guard(self)

    def fix_tab_order(self) -> None:
        """Tab goes down the panel as it is laid out: the task, the form's fields in order (a ControlNet
        unit's fields in its box), model, backend, device, precision, seed, Run. Qt's default follows
        creation, and the form is created after the boxes below it."""
        chain = focus_chain(self)
        for first, second in zip(chain, chain[1:], strict=False):
            QWidget.setTabOrder(first, second)

    def _control_editor(self, param: Any) -> QWidget:
        task = self.registry.task(self.task_box.currentText())
        field = ControlUnitsField(self.controlnets, self.registry, self.source, bool(task.inputs), self.source_path)
        field.on_change = lambda: (self.fix_tab_order(), self.keep_wheel())  # a unit added or removed
        return field

    def _model_editor(self, param: Any) -> QWidget:
        return ModelNameField(param, self.models)

    def _show_availability(self) -> None:
        task = self.registry.task(self.task_box.currentText())
        reason = task.availability(self.model_choice())
        text = task.summary + ("" if reason is None else f"\n⚠ {reason}")
        self.task_status.setText(for_the_window(text, [p.name for p in task.params])[0])

    def remember(self) -> None:
        """Keep the current form's values and model for its task (restored when the task is picked again).

        Files (image, mask, path parameters) are not kept: a stale file must never stand in for a mask
        painted later, or name a file that has gone.
        """
        if self.form is not None:
            files = {p.name for p in self.form.task.params if p.type in ("image", "mask", "path")}
            values = {
                k: v for k, v in self.form.values().items() if isinstance(v, (str, int, float, bool)) and k not in files
            }
            self.settings.setValue(f"params/{self.form.task.name}", json.dumps(values))
            self.settings.setValue(f"model/{self.form.task.name}", self.model_box.currentText())

    def _remembered(self, task: str) -> dict[str, Any]:
        try:
            values = json.loads(str(self.settings.value(f"params/{task}", "{}")))
        except ValueError:  # a settings file edited by hand: start from the defaults
            return {}
        return values if isinstance(values, dict) else {}

    def _offer_models(self, task: Any) -> None:
        """Show only the listed models of the families the task runs (models added by Browse always show);
        the task's last model comes back when it is still offered. The first entry says "(default)" only
        for a task that has a default model (generate has none: it reads "(choose a model)")."""
        self.model_box.setItemText(0, DEFAULT_CHOICE if task.availability(None) is None else NO_MODEL)
        view, items = self.model_box.view(), self.model_box.model()
        for index in range(self.model_box.count()):
            family = self.model_box.itemData(index, FAMILY_ROLE)
            hidden = family is not None and not runs_family(self.registry, task, family)
            view.setRowHidden(index, hidden)
            items.item(index).setEnabled(not hidden)  # the wheel and arrow keys skip it too
        last = self.model_box.findText(str(self.settings.value(f"model/{task.name}", "")))
        if last >= 0 and not view.isRowHidden(last):
            self.model_box.setCurrentIndex(last)
        elif view.isRowHidden(self.model_box.currentIndex()):
            self.model_box.setCurrentIndex(0)

    def offered_models(self) -> list[str]:
        """The model picker's entries the current task can run."""
        view = self.model_box.view()
        return [self.model_box.itemText(i) for i in range(self.model_box.count()) if not view.isRowHidden(i)]

    def model_choice(self) -> str | None:
        text = self.model_box.currentText()
        if text in (DEFAULT_CHOICE, NO_MODEL, "Browse…", "Browse file…", ""):
            return None
        return self.model_box.currentData() or text

    def _on_model_picked(self, index: int) -> None:
        label = self.model_box.itemText(index)
        if label in ("Browse…", "Browse file…"):
            start = str(self.settings.value("model_dir", ""))
            if label == "Browse…":
                folder = QFileDialog.getExistingDirectory(self, "Model folder", start)
            else:  # single-file checkpoints (Stable Diffusion .safetensors)
                folder, _ = QFileDialog.getOpenFileName(
                    self, "Model file", start, "Checkpoints (*.safetensors *.ckpt);;All files (*)"
                )
            if folder:
                self.model_box.insertItem(index, Path(folder).name, folder)
                self.model_box.setCurrentIndex(index)
                self.settings.setValue("model_dir", str(Path(folder).parent if Path(folder).is_file() else folder))
            else:
                self.model_box.setCurrentIndex(0)
        self._apply_family_defaults()
        self._show_availability()

    def _apply_family_defaults(self) -> None:
        """A picked model whose family has its own defaults (Flux.1 dev: guidance 3.5; schnell: 4 steps) puts
        them in the form, as the preflight gives them to a CLI run that names neither. Picking another model
        puts the declared defaults back where the form still holds what the family set (schnell's CFG 0 must
        not follow the user to an SD model); a value the user typed meanwhile stays."""
        path, form = self.model_box.currentData(), self.form
        if form is None:
            return
        family = self.registry.family_for(Path(path), form.task.name) if path else None
        own = dict(family.defaults(family.detect(Path(path)) or "", form.task.name)) if family is not None else {}
        now = form.values()
        form.reset([k for k, v in self._family_set.items() if k not in own and now.get(k) == v])
        form.set_values(own)
        self._family_set = {k: form.values().get(k) for k in own}

    def _show_seed(self) -> None:
        fixed = self.seed_box.value() >= 0
        self.seed_box.setPrefix("fixed: " if fixed else "")
        self.seed_box.setToolTip(
            "every job uses this seed (the same noise each time); random: a new seed per job"
            if fixed
            else "a new random seed for every job; type a number to fix it (Reuse parameters sets the result's)"
        )
        self.seed_random.setEnabled(fixed)

    def apply_options(self, options: dict[str, Any]) -> list[str]:
        """Set the model, backend, device, precision, backend options and seed a record names (reuse);
        returns, in words, what this machine cannot set."""
        notes: list[str] = []
        if "seed" in options:
            self.seed_box.setValue(int(options["seed"]))
        task = self.registry.task(self.task_box.currentText())
        if not task.uses_model:
            return notes
        model = str(options.get("model") or "")
        if model:
            index = self._find_model(model)
            if index >= 0:
                self.model_box.setCurrentIndex(index)
                self._show_availability()
            else:
                notes.append(f'the model {model} is not listed here: choose it in "model"')
        for key, box, label in (
            ("device", self.device_box, "device"),
            ("backend", self.backend_box, "backend"),
            ("dtype", self.dtype_box, "precision"),
        ):
            wanted = options.get(key)
            if not wanted:
                continue
            index = box.findText(str(wanted))
            usable = index >= 0 and box.model().item(index).isEnabled()  # type: ignore[attr-defined]
            if usable:
                box.setCurrentIndex(index)
            else:
                notes.append(f'{label} {wanted} is not available here: "{label}" is {box.currentText()}')
        recorded = options.get("backend_options")
        if isinstance(recorded, dict) and self.options_form is not None:
            self.options_form.reset()
            self.options_form.set_values({k: v for k, v in recorded.items() if k in self.options_form.widgets})
        return notes

    def _find_model(self, name: str) -> int:
        """The offered entry of the model a record names (its listed name, or a Browsed file's name)."""
        view = self.model_box.view()
        for index in range(self.model_box.count()):
            if view.isRowHidden(index):
                continue
            data = self.model_box.itemData(index)
            names = {self.model_box.itemText(index)}
            if data:
                names |= {Path(str(data)).name, Path(str(data)).stem}
            if name in names:
                return index
        return -1

    def run_options(self, uses_model: bool) -> dict[str, Any]:
        """Model, backend, device, precision and backend options for :func:`difftool.app.api.run`."""
        options: dict[str, Any] = {"seed": None if self.seed_box.value() < 0 else self.seed_box.value()}
        if uses_model:
            options |= {
                "model": self.model_choice(),
                "backend": self.backend_box.currentText() or "torch",
                "device": self.device_box.currentText(),
                "dtype": self.dtype_box.currentText(),
                "backend_options": self.options_form.values() if self.options_form is not None else {},
            }
        return options
