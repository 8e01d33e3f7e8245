"""Model compression tools, clients of the model: post-training quantization (RTN, AWQ, GPTQ) to a tokenmill
checkpoint, and quality evaluation (perplexity). The formats they write are in tokenmill.quant."""
