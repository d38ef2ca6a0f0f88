"""NeMo-Run recipes: megacredit's trainer as a configured ``run.Partial``, for the four methods.

Paper scale (Qwen3-8B, 1 node x 8 GPUs, CREDIT Table 3): :mod:`credit_8b`, :mod:`sdpo_8b`,
:mod:`grpo_8b`, :mod:`rlsd_8b`. Tiny CPU size (a 2-layer random model, seconds per step):
:mod:`tiny_cpu`. Each recipe function returns ``run.Partial(train_config, cfg=run.Config(
MegacreditConfig, ...))``: the whole typed config tree, editable before launch
(``recipe.cfg.optimizer.lr = 2e-6``). Launch from Python with :func:`base.local_executor`
(torchrun) or :func:`base.slurm_executor`, or from the command line::

    python -m megacredit.recipes.credit_8b --executor slurm --account A --partition P [key=value ...]
    python -m megacredit.recipes.tiny_cpu --executor local --ntasks 2 parallel.tensor_model_parallel_size=2
    python -m megacredit.recipes.credit_8b --executor slurm --dryrun   # print, submit nothing

NeMo-Run is the optional ``[nemo]`` extra (``pip install -e .[nemo]``): importing megacredit, or
this package, never needs it; only building a recipe does.
"""
