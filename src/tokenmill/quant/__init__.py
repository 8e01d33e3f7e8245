"""Weight formats the model runs on: QuantizedWeight (int8/int4), GGUF blocks and their exact repacking, the
tokenmill checkpoint layout. The tools that produce them are in tokenmill.compress."""
