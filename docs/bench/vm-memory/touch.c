/* What a page fault of fresh anonymous memory costs: maps GIB GiB and writes one byte
 * into each 4 KiB page, printing the mean time per page for each GiB in turn.
 * Build: cc -O2 -o touch touch.c   (BENCHMARKS.md, "New memory on this VM") */
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>

#define GIB 20

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    size_t gib = 1ul << 30;
    char *m = mmap(0, gib * GIB, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (int g = 0; g < GIB; g++) {
        double start = now();
        for (size_t offset = 0; offset < gib; offset += 4096)
            m[g * gib + offset] = 1;
        printf("GiB %d: %.2f us/page\n", g, (now() - start) / (gib / 4096) * 1e6);
        fflush(stdout);
    }
    return 0;
}
