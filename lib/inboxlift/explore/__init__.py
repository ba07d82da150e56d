"""Small summaries for the notebooks: Spark aggregates down to a few rows, then tables and plots.

Everything here returns data whose size does not grow with the number of users (a histogram's
bins, a 5 x 5 grid, a handful of example users), so the notebooks can show it as pandas.
"""
