"""CLIP itself: loading any model (``load``), the one adapter over openai-clip and OpenCLIP (``adapter``), the
tokenizer (``tokens``), the causal-prefix text encoder (``textenc``), the prompt ensemble (``prompts``),
encoding batches (``encode``), the views that discovery looks through (``discovery``) and the ascent's token
choosers (``choosers``)."""
