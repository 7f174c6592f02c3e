"""What is remembered and served: Faust tables and the web views over them."""
