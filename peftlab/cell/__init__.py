"""One cell: config -> load -> quantize -> attach -> train -> generate -> score -> one flat record."""
