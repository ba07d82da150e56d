"""The campaign report's figures and its one static HTML page (README "Results and experiments")."""
