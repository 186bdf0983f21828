"""Runtimes that serve a merged FlexQuant checkpoint: the CPU reference and the vLLM launcher.

Kept import-free on purpose: vLLM imports `workbench.runtime.vllm_plugin` in every worker process,
and that must not drag torch-heavy CPU runtime modules in with it.
"""
