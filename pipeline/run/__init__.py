"""A run: its config (``config``, ``configdoc``), its inputs (``images``), its directory (``rundir``), what each
output was made with (``provenance``), and executing the stages (``stage``, ``runner``, ``batching``,
``distributed``)."""
