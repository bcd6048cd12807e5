"""The renderer of the generated documentation: blocks of Markdown and pictures drawn from ``bench/results/``
(``python -m bench.render_readme``)."""
