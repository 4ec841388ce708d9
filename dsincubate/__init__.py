"""dsincubate: Deep Incubation (divide a ViT into K modules, incubate each inside a frozen meta model, assemble,
fine-tune) and its E2E baseline on DeepSpeed engines. Entry point: the `dsincubate` command (dsincubate.cli)."""

__version__ = "0.1.0"
