"""Where everything of a run lives: one `RunLayout(root)` names every directory and file under a run's `--output`.

    <root>/config.json                        the run's resolved config (written once)
    <root>/meta/model.safetensors             meta model            (MetaPhase)
    <root>/incubate/module_<i>/stage.safetensors  target stage i    (IncubatePhase, stage_index i)
    <root>/m2mkd/module_<i>/stage.safetensors  student stage i      (M2mkdPhase, stage_index i)
    <root>/m2mkd/assemble/model.safetensors   the K students joined (assemble --method m2mkd)
    <root>/m2mkd/finetune/model.safetensors   m2mKD's result        (M2mkdFinetunePhase)
    <root>/assemble/model.safetensors         the K stages joined   (dsincubate.assemble)
    <root>/finetune/model.safetensors         Deep Incubation's result
    <root>/e2e/model.safetensors              the E2E baseline
    <root>/e2e_tune/model.safetensors         the E2E model tuned for fine-tune's extra epochs (the paper's control)
    <root>/export/<source>/                   timm-named weights + model.json
    <root>/summary.json                       the pipeline's table

The phases' directories and files are their `dsincubate.registry` entries' (`out_dir`, `output_file`). Every phase
directory holds `run.json`, `config.json`, `ds_config.json`, `metrics.jsonl`, `tb/`, `checkpoints/` and,
written last, `MANIFEST.json`. Phases, assembly, accounting, the summary, `eval` and the benchmarks all ask this class
for paths, so there is one spelling of each.
"""
from __future__ import annotations

from pathlib import Path

from dsincubate import registry

META_FILE = "model.safetensors"
STAGE_FILE = "stage.safetensors"
MODEL_FILE = "model.safetensors"


class RunLayout:
    def __init__(self, root):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def phase_dir(self, name: str, stage_index: int | None = None) -> Path:
        """The output directory of a training phase (a per-stage one, e.g. `incubate`, needs its stage index)."""
        return self.root / registry.phase(name).output_dir(stage_index)

    @property
    def meta(self) -> Path:
        return self.phase_dir("meta") / META_FILE

    def stage(self, stage_index: int) -> Path:
        return self.phase_dir("incubate", stage_index) / STAGE_FILE

    @property
    def assemble_dir(self) -> Path:
        return self.assemble_dir_of("incubate")

    def assemble_dir_of(self, method: str) -> Path:
        """Where the modules trained by the per-stage phase `method` (incubate or m2mkd) are joined."""
        return self.root / registry.phase(method).assembly_dir

    @property
    def assembled(self) -> Path:
        return self.assemble_dir / MODEL_FILE

    def model(self, name: str) -> Path:
        """The model file a phase (meta, finetune, e2e, ...) or an assembly (assemble, m2mkd_assemble) wrote."""
        assembled = registry.assemblies().get(name)
        if assembled is not None:
            return self.assemble_dir_of(assembled.name) / MODEL_FILE
        return self.phase_dir(name) / registry.phase(name).output_file

    def export_dir(self, source: str) -> Path:
        return self.root / "export" / source
