"""Theory: the volumes that losses imply under known label uncertainty."""
