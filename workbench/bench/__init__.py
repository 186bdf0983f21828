"""`flexquant bench`: FlexQuant vs stock single-variant vLLM, side by side in one run (issue #5).

The measuring half starts engines, drives their OpenAI endpoint and writes one results JSON per run
(schema "flexquant-bench/1", see `report.load_results`). The analysis half is pure and runs anywhere:
`autotune` turns the stock batch sweep into a named policy plus the one int4 kernel to load;
`report` turns a results dict into DataFrames, goal verdicts and a README table; `report_html` writes
the one HTML file;
`figures` draws those DataFrames as Plotly figures.
"""
