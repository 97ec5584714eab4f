"""Input and output around the run, below everything else: what the user sees (`console`) and files written
so that a crash never leaves half of one (`atomic`)."""
