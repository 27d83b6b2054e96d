"""The modality-free library. It imports no tokenizer, objective or plugin module: components come
from the registries the plugin manager fills (`anymodal.plugins.load_components`), by name.

Read from the bottom up:

- the currency: `tokens` (Tokens), `errors` (what a user's input can cause), `args` (argument checks);
- the model: `attention`, `layers`, `posenc`, `encoder`, `decoder`, `backbone` (tokenizer + encoder);
- what an objective sees: `masking`, `objective` (Batch, ObjectiveOutput, the Protocols), `teachers`;
- names to modules: `registry`, `schema`, `config` (compose, validate), `build`;
- running: `data` (deterministic loaders), `device`, `schedule`, `distributed`, `parallel` (DDP,
  FSDP2), `checkpoint`, `safe_shards`, `runfolder`, `resume`, `stage` (a stage's set-up), `trainer` (its loop);
- after training: `monitor`, `evaluate`, `pictures`, `export`, `timm_compat`.

The command line, Slurm submission and doctor are the application layer, `anymodal.app`.
"""
