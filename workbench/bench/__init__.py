"""`flexquant bench`: FlexQuant vs stock single-variant vLLM, side by side in one run (issue #5).

The measuring half (`engines`, `client`, `measure`, `runner`, `weights`) starts engines, drives their OpenAI
endpoint and writes one results JSON per run (schema "flexquant-bench/1", see `report.load_results`);
`store` keeps such a file in the DB. The analysis half is pure and runs anywhere: `autotune` turns
the stock batch sweep (read and checked by `autotune_sweep`) into a named policy plus the one int4
kernel to load; `report` checks a results dict and flattens it into DataFrames; `goals` judges the
issue's goals and writes the README table; `figures` draws the DataFrames as Plotly figures;
`report_html` writes the one HTML file.
"""
