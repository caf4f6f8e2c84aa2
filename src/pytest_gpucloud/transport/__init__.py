"""Getting to instances and getting code onto them: SSH connections and the code sync."""
