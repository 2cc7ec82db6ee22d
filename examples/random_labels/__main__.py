from examples.random_labels.experiment import main

main()
