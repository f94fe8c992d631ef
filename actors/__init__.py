"""Ray actors (the live engine); see issue 3."""
