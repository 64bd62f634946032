from megatron_opcd.demo.tiny import main

if __name__ == "__main__":
    main()
