/* kiln-init: PID 1 inside every sandbox.
 *
 *     kiln-init PROGRAM ARGS...     (the agent's server: the runtime's python running guest.py)
 *
 * It detaches from the host console, starts the server, reaps every orphan, and starts the server
 * again whenever it dies (KILN_AGENT_STARTS tells it how many servers this sandbox has had). A
 * Python PID 1 doing only this cost ~7 MB of the sandbox's host memory (its cgroup: 28.7 -> 21.0 MB)
 * and 14 MB of RSS; this is static, so it runs in any image, whatever libc it has or lacks.
 *
 * PID 1 of a PID namespace gets no signal it has not asked for from inside: it asks for none.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LOG_DIR "/run/kiln-agent"
#define AGENT_LOG LOG_DIR "/agent.log"

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) == -1 && errno == EINTR) {
    }
}

/* PID 1's stdio is a file on the host (runsc's console log): nothing in the sandbox may reach it
 * (root could write gigabytes there through /proc/1/fd/2). stdin and stdout become /dev/null; the
 * agent's few messages go to a log on the sandbox's own tmpfs. */
static void detach_from_host_console(void) {
    mkdir(LOG_DIR, 0700);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    int log = open(AGENT_LOG, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (null < 0 || log < 0) {
        perror("kiln-init: detach from the host console");
        return; /* the server runs all the same: better than no agent */
    }
    dup2(null, 0);
    dup2(null, 1);
    dup2(log, 2);
    close(null);
    close(log);
}

static pid_t start_server(char **argv, int started) {
    char count[16];
    snprintf(count, sizeof count, "%d", started);
    setenv("KILN_AGENT_STARTS", count, 1);
    for (;;) {
        pid_t pid = fork();
        if (pid == 0) {
            execv(argv[0], argv);
            perror("kiln-init: start the agent's server");
            _exit(127);
        }
        if (pid > 0)
            return pid;
        pause_ms(500); /* no pid free (a fork bomb): PID 1 must not die, so wait and retry */
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: kiln-init PROGRAM ARGS...\n");
        return 2;
    }
    if (getpid() == 1)
        detach_from_host_console();
    int started = 1;
    pid_t server = start_server(argv + 1, started);
    for (;;) {
        pid_t pid = wait(NULL);
        if (pid < 0) {
            if (errno == ECHILD)
                pause_ms(500);
            continue;
        }
        if (pid == server) {
            pause_ms(200);
            fprintf(stderr, "kiln-agent: the server died; starting it again\n");
            server = start_server(argv + 1, ++started);
        }
    }
}
