"""The EXL2 format, both sides: bit layout, packing, metadata, the checkpoint reader and writer,
dequantized linears, inspection."""
