"""Pure profile logic: identity rules (``identity``) and the profile fold (``profile``). No I/O here."""
