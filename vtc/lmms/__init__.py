"""vtc as an lmms-eval model (lmms-eval 0.7.x; the optional extra ``vtc[lmms]``).

``lmms-eval --model vtc --model_args ckpt_path=...,compressor=pool,stride=2 --tasks ... --batch_size 8``
evaluates a vtc checkpoint or a released LLaVA directory, compressed at test time as the model
args say. Registered through the ``lmms_eval.models`` entry point (pyproject.toml) with
:func:`vtc.lmms.manifest.manifests`; the model is :class:`vtc.lmms.model.VtcLMM`, which answers
through :func:`vtc.load` (:mod:`vtc.eval.predict`), so lmms-eval gets eval.py's answers.
"""
