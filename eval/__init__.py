"""Evaluation harness for BA-LoRA models: GSM8K, MATH, HumanEval, MBPP and MT-Bench on vLLM, transformers or an
OpenAI-compatible server. ``python -m eval TASK --model PATH``; the API is :func:`eval.cli.main`."""
