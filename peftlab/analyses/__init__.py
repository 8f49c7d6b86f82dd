"""The papers' and lectures' reproductions, built on the engine: rank versus parameters, Table 3's
counts, the memory estimate against measured cells, and the quantizer comparison. They read the
engine and its records; nothing in the engine reads them."""
